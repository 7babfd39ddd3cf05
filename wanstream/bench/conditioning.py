"""The VACE conditioning's cost in ``wanstream bench --reference IMG / --control KIND``: the same streams run plain and
conditioned (two rows); this table puts the conditioned row's stages next to the plain one's.

Per tick (one chunk per stream and tick, steady state): the preprocessor (``control``), the VAE encode of the control
frames (``control_encode``), the DiT (its VACE blocks and the reference prefix are the extra DiT work) and the whole
tick; the reference's one DiT pass happens once per change (``reference ms once``, not per chunk).
"""

from __future__ import annotations

CONDITIONING_STAGES = ("control", "control_encode")
COND_COLUMNS = ["res", "steps", "conditioning", "control ms", "ctl enc ms", "DiT ms", "DiT x plain", "tick ms",
                "ref once ms"]


def label(reference: bool, control: str | None) -> str:
    parts = (["ref"] if reference else []) + ([control] if control else [])
    return " + ".join(parts) or "plain"


def conditioning_rows(rows: list[dict]) -> list[list[str]]:
    def f(v, fmt=".1f"):
        return "–" if v is None else format(v, fmt)
    plain = {(r["resolution"], r["steps"], r["sessions"]): r for r in rows if r.get("conditioning") == "plain"}
    out = []
    for r in rows:
        if "conditioning" not in r:
            continue
        st = r["stage_ms"]
        base = plain.get((r["resolution"], r["steps"], r["sessions"]))
        ratio = st["dit"] / base["stage_ms"]["dit"] if base and base["stage_ms"]["dit"] else None
        out.append([r["resolution"], str(r["steps"]), r["conditioning"], f(st.get("control")),
                    f(st.get("control_encode")), f(st["dit"]), f(ratio, ".2f"), f(st["chunk"]),
                    f(r.get("reference_once_ms"))])
    return out
