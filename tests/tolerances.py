"""The tests' one tolerance table, in units of each dtype's machine epsilon
(``torch.finfo(dtype).eps``: 2.2e-16 float64, 1.2e-7 float32, 9.8e-4 float16, 7.8e-3 bfloat16).

- ``MODEL_TOL[dtype] = (forward, gradient)``: ``rel_err`` (norm of the difference over the
  reference's norm) of a whole model computing in ``dtype`` against ``vmae_fast.reference`` (or
  against fp32 for bf16 autocast). Gradients pass through every block backwards, so they get 8-10x
  the forward's budget. float64: the models' sin-cos tables are rounded to float32 once (as the
  official ones), which bounds the agreement far above float64's epsilon.
- ``KERNEL_TOL[dtype] = (atol, rtol)``: one fused op against its reference, elementwise
  (``atol`` scaled by the reference's largest value where a test says so): a few roundings of a
  reduction in the op's compute dtype.

A tolerance here separates a right answer from a near miss: the planted bugs of the suite
(issue 23: eps placement, biased variance, a missing loss division) miss by far more.
"""
from __future__ import annotations

import torch


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


MODEL_TOL = {
    torch.float64: (2 ** 19 * eps(torch.float64), 2 ** 22 * eps(torch.float64)),  # 1.2e-10, 9.3e-10
    torch.float32: (96 * eps(torch.float32), 2 ** 10 * eps(torch.float32)),  # 1.1e-5, 1.2e-4
    torch.bfloat16: (2.5 * eps(torch.bfloat16), 6 * eps(torch.bfloat16)),  # 2.0e-2, 4.7e-2
}

KERNEL_TOL = {
    torch.float64: (2 ** 13 * eps(torch.float64),) * 2,  # 1.8e-12
    torch.float32: (96 * eps(torch.float32),) * 2,  # 1.1e-5
    torch.float16: (2 * eps(torch.float16),) * 2,  # 2.0e-3
    torch.bfloat16: (2 * eps(torch.bfloat16),) * 2,  # 1.6e-2
}
