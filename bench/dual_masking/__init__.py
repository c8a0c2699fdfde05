"""``python -m bench.dual_masking`` (``make bench``, ``vmae-bench dual-masking``): dual vs
encoder-only masking and vmae_fast vs the official computation (``cli`` says what it measures).

``plan``: presets and the plan a command line makes of them; ``run``: every cell measured;
``metrics``: the numbers derived from the rows and the goals; ``markdown``: the printed tables.
"""
from .cli import cli, main

__all__ = ["cli", "main"]
