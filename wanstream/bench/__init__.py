"""Measurement: the live benchmark harness and its report, roofline accounting, VAE comparisons.
An application: imports anything below it (``api`` and lower), never ``server``, ``eval`` or ``cli``.
"""
