"""The public Python API: a live stream (``session``), text-to-video (``t2v``), restyling files (``restyle``),
live parameters (``params``) and presets (``presets``) as data. Imports ``core`` … ``pipeline``; nothing here
parses a command line.
"""
