"""What this installation has: ``python -m vmae_fast.info``.

One line each: the versions, whether the native CPU extension ``vmae_fast._C`` built and loads
here (and why not), which video decoders load, what ``--dtype auto`` picks on this machine, the
CPUs the process may use, and which optional extras are importable. For a bug report, and to
check an install (``pip install --no-build-isolation ...``, README "Installing into an existing
environment"). Exit status 0, or 1 when the extension is built but cannot serve this torch.
"""
from __future__ import annotations

import importlib.util
import platform
import sys
from importlib import metadata
from typing import Sequence

# extra -> the modules it brings that the code imports (pyproject.toml's optional dependencies)
EXTRAS = {"train": ("av", "tqdm", "PIL", "tensorboard"), "bench": ("matplotlib", "tqdm"),
          "export": ("onnx", "onnxscript", "onnxruntime"), "test": ("pytest", "transformers")}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed (running from a source tree)"


def report() -> tuple[list[str], int]:
    """``(lines, exit status)``."""
    import torch

    from . import _native
    from .device import auto_dtype, available_cpus
    from .video.decoders import DECODERS, why_unavailable

    st = _native.status()
    native = {"loaded": "loaded", "disabled": f"off ({st.reason})"}.get(
        st.state, f"{st.state.replace('_', ' ')}: {st.reason}")
    if st.state == "not_built":
        native += f"; to build it: {_native.BUILD_COMMAND}"
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() \
        else "no CUDA device"
    decoders = ", ".join(f"{d} {'ok' if why_unavailable(d) is None else 'no'}" for d in DECODERS)
    dtype, why = auto_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    extras = ", ".join(f"{name} {'yes' if all(importlib.util.find_spec(m) for m in mods) else 'no'}"
                       for name, mods in EXTRAS.items())
    lines = [f"vmae-fast {_version('vmae-fast')}, torch {torch.__version__} ({cuda}), "
             f"Python {platform.python_version()}, {platform.machine()}",
             f"native extension vmae_fast._C: {native}",
             f"video decoders: {decoders}",
             f"--dtype auto: {dtype} ({why}); {available_cpus()} CPUs available to this process",
             f"extras importable: {extras}"]
    return lines, 1 if st.state == "broken" else 0


PROG = "python -m vmae_fast.info"


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import ArgumentParser

    # no options: a stray word (a flag of another command) is a usage error, not ignored
    ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0]).parse_args(argv)
    lines, status = report()
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main, PROG))
