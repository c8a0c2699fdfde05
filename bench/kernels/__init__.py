"""``python -m bench.kernels`` / ``vmae-bench kernels``: the fused ops timed against their
references, and (``--compile-only``) every kernel variant compiled for sm_80/sm_90 without a GPU.
The command line and its flags: ``cli.py``.

    cli.py           flags, the plan, ``main(argv) -> dict`` (the result that is saved)
    cases.py         the shapes, the inputs, one setup function per op (reference, fused, bytes)
    timing.py        each op's variants timed; the Markdown table of the timings
    aot_capture.py   --compile-only: the launchers run on meta tensors, each launch a compile key
    aot_compile.py   --compile-only: one key compiled for one target; registers, spills, occupancy
    aot_report.py    --compile-only: the run, its JSON and Markdown
"""
from .cli import main

__all__ = ["main"]
