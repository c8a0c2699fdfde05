"""``python -m bench.gpu_check`` (``make gpu-check``, ``vmae-bench gpu-check``): the first GPU hour
in one command. Every GPU claim of the project proved or disproved within 8 minutes on an H100.

``plan``: the parts and their time shares; ``parts``: one function per part; ``run``: the parts
in order, each stopped when its share is spent; ``estimate``: the plan's wall time on a GPU from
exact FLOPs and bytes at datasheet rates; ``report``: the goals judged, JSON and Markdown.
"""
from .cli import cli, main

__all__ = ["cli", "main"]
