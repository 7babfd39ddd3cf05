"""The README's Python example runs as written (on the tiny model) and gives every input frame back."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_yields_every_input_frame(tiny_model, tiny_model_dir):
    from wanstream.io.video import make_motion_clip
    clip = make_motion_clip(21, 96, 80)                 # another size than the session's: framed
    shown = []
    code = _example().replace('load_model("models")', "load_model(MODEL_DIR, device='cpu')")
    namespace = {"MODEL_DIR": tiny_model_dir, "camera": lambda: iter(clip), "show": shown.append}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert len(shown) == len(clip) == 21                # the 17-of-21 bug: frames a step change finished were lost
    assert all(img.shape == (512, 512, 3) for img in shown)
