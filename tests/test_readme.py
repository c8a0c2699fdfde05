"""The README's quick start runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)
    out, masks = scope["out"], scope["masks"]
    assert out.pred.shape == (2, masks.n_decoder, 1536) and masks.n_decoder == 784
    assert scope["model"].mask_token.grad is not None
