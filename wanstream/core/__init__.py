"""The pure core: decisions on host integers, no torch (importing it loads none; tests/test_layers.py checks).

The chunk rule and frame numbering (``chunking``), the stream-batch schedule and the calls it composes
(``schedule``), the SLO-aware tick policy and its latency model (``scheduler``), the multi-GPU block scheduler
(``block_scheduler``), configuration as data (``config``) and the error types every layer raises (``errors``).
Imports nothing from the rest of wanstream.
"""
