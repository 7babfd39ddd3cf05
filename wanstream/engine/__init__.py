"""The engine: executes the core's decisions on a device for every stream of a model.

The tick loop (``loop``), a stream's state (``stream``), the one-device runner of DiT calls (``runner``), VAE work
across streams, frame transfer, timing, the noise sources and the motion-aware noise controller, per-stream
latency metrics. Imports ``core``, ``io`` and ``models`` only.
"""
