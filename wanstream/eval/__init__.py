"""Quality evaluation: the paper's CLIP score and warp error, CLIP temporal consistency, drift, per prompt
segment (``wanstream eval``; definitions in docs/eval.md).

``models`` finds and downloads CLIP / RAFT, ``clip`` and ``flow`` run them, ``metrics`` holds the versioned
definitions, ``evaluate`` scores a video pair, ``report`` renders HTML. None of these import the streaming engine,
so any pair of videos can be scored; only ``sweep`` runs wanstream, through its public API.
"""
