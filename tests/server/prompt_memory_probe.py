"""RSS of a process that changes a stream's prompt to N distinct prompts, as the server's model worker does
(a thread of its own: the prompt embedding through ``conditioning``, then the stream's K/V swap).

Run by test_server_hardening.py in a fresh process (RSS of the test process would mix in everything else):
``python prompt_memory_probe.py MODEL_DIR N`` prints one JSON line: RSS in MiB after warm-up and after every
30 prompts, and the prompt cache's state.
"""

from __future__ import annotations

import json
import sys
import threading

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    from wanstream.api.params import SessionParams, conditioning
    from wanstream.api.session import StreamSession
    from wanstream.models.loader import load_model
    from wanstream.server.settings import ServerSettings

    torch.set_num_threads(2)
    model_dir, n = sys.argv[1], int(sys.argv[2])
    model = load_model(model_dir, device="cpu")
    model.text_encoder.limit_cache(max_bytes=ServerSettings().prompt_cache_bytes)   # as create_app does
    report: dict = {"rss_mib": []}

    def worker() -> None:
        with torch.inference_mode():
            stream = StreamSession(model, prompt_embeds=conditioning(model, SessionParams(prompt="warm up")),
                                   width=64, height=64, steps=2)
            for i in range(n):
                params = SessionParams(prompt=f"prompt {i}: a painting of {7 * i} cats on a roof, style {i % 13}")
                stream.set_prompt_embedding(conditioning(model, params))
                if i % 10 == 0:
                    report["rss_mib"].append(round(rss_mib(), 1))
            report["rss_mib"].append(round(rss_mib(), 1))
            stream.close()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    report["cache"] = model.text_encoder.cache_info()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
