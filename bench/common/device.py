"""What machine a benchmark ran on, its datasheet peak, and its measured ceilings."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from vmae_fast import envs
from vmae_fast.flops import datasheet_hbm_gbps, datasheet_peak_tflops

from . import paths
from .timing import time_fn


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); "unknown" when installed, where
    git would answer for whatever repository happens to hold the environment."""
    root = paths.SOURCE_ROOT
    if root is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def module_version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # a missing or broken optional package
        return None


def native_status() -> str:
    """'built' if the native extension loads, else its loader's state and why (disabled, not
    built, or built but broken here: ``vmae_fast._native.status``)."""
    from vmae_fast import _native

    st = _native.status()
    return "built" if st.state == "loaded" else f"{st.state.replace('_', ' ')} ({st.reason})"[:200]


def fused_op_paths(device: torch.device) -> dict[str, str]:
    """Which implementation each fused op runs on ``device`` now, and why not a faster one."""
    from vmae_fast.ops._dispatch import kernel_paths

    return {op: paths.get(device.type, "reference (no kernel for this device)")
            for op, paths in kernel_paths().items()}


def device_info(device: torch.device) -> dict:
    info = {
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "timm": module_version("timm"),
        "numpy": module_version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(),
        "native_ext": native_status(),
        "fused_ops": fused_op_paths(device),
        "env": envs.snapshot(),
    }
    try:
        import vmae_fast

        info["vmae_fast"] = vmae_fast.__version__
    except Exception:
        info["vmae_fast"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    total_memory=p.total_memory, driver=_nvidia_driver())
        info["bf16_dense_peak_tflops"] = datasheet_peak_tflops(p.name)
        info["hbm_gbps"] = datasheet_hbm_gbps(p.name)
    else:
        info["name"] = f"CPU {info['cpu_model']} ({torch.get_num_threads()} threads)"
        info["bf16_dense_peak_tflops"] = info["hbm_gbps"] = None
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def device_slug(info: dict) -> str:
    if info["device_type"] == "cuda":
        name = info["name"]
    else:
        model = info["cpu_model"].split("@")[0].replace("(R)", "").replace("(TM)", "").replace("Processor", "")
        name = f"{model} {info['torch_threads']}t"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in slug.split("-") if p)[:40]


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None,
                   repeats: int = 10) -> dict:
    """TFLOP/s of one large square matmul on random data (never zeros), timed like the bench:
    the practical compute ceiling MFU can also be read against."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    st = time_fn(lambda: torch.mm(a, b, out=out), device, warmup=3, repeats=repeats)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / st.median / 1e12,
            "seconds": st.to_dict()}


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    st = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return {"bytes": 2 * src.numel() * 4, "gbps": 2 * src.numel() * 4 / st.median / 1e9,
            "seconds": st.to_dict()}
