"""Build script: the Python package plus the optional native extension ``vmae_fast._C``.

The extension is C++ (``kernels/``) built through CMake against the installed torch. It is
optional: ``VMAE_FAST_NO_EXT=1`` skips it, and a machine where it cannot build (no torch in the
build environment, no compiler, no cmake) still installs the package; the ops then fall back to
Triton / PyTorch and say once how to build it. To build it, torch must be importable at build
time, and must not change afterwards: install the dependencies first (``pip install -e .``, torch
among them), then build the extension last, with ``pip install --no-build-isolation --no-deps -e .``
(what ``make test`` does), so that no resolver can upgrade torch under the built library.

The library is named after the torch it is built against (``vmae_fast/_C-torch<version><EXT_SUFFIX>``,
the name ``vmae_fast/_native.py`` computes and looks for), so builds for several torch versions,
one per virtualenv using this source tree (``make test`` / ``make test-oldest``), coexist.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _library_module(name: str):
    """``vmae_fast/<name>.py`` loaded from its file: importing the ``vmae_fast`` package would
    need its dependencies. The build then reads switches and names by the library's own rules."""
    spec = importlib.util.spec_from_file_location(f"_vmae_fast_{name}_at_build", ROOT / "vmae_fast" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip_reason() -> str | None:
    if _library_module("envs").VMAE_FAST_NO_EXT:
        return "VMAE_FAST_NO_EXT is set"
    if not list((ROOT / "kernels").glob("*.cpp")):
        return "kernels/ has no C++ sources"
    if _cmake() is None:
        return "cmake not found"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not importable in the build environment (use --no-build-isolation)"
    return None


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # pip's cmake wheel, whose bin/ may not be on PATH

            found = shutil.which("cmake", path=cmake.CMAKE_BIN_DIR)
        except (ImportError, AttributeError):
            pass
    return found


@functools.lru_cache(maxsize=None)
def _library_name() -> str | None:
    """``vmae_fast._native.library_name`` of the importable torch (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return _library_module("_native").library_name(torch.__version__)


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # setuptools builds into, copies in place and records the extension under this name
        # (asked with "vmae_fast._C", and with "_C" by get_ext_fullpath)
        filename = super().get_ext_filename(fullname)
        name = _library_name() if fullname in ("vmae_fast._C", "_C") else None
        return filename if name is None else os.path.join(os.path.dirname(filename), name)

    def run(self):
        reason = _skip_reason()
        if reason is not None:
            self._warn(f"skipping vmae_fast._C: {reason}")
            return
        start = time.perf_counter()
        try:
            super().run()
            print(f"vmae-fast: built vmae_fast._C in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        except Exception as exc:  # a failed optional build must not fail the install
            self._warn(f"building vmae_fast._C failed ({exc}); installing without it")

    @staticmethod
    def _warn(msg: str) -> None:
        print(f"\n*** vmae-fast: {msg}. Ops fall back to Triton/PyTorch; to build the native "
              "extension, after the dependencies (pip install -e .), run: "
              "pip install --no-build-isolation --no-deps -e .\n", file=sys.stderr)

    def build_extension(self, ext: CMakeExtension) -> None:
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()  # .../vmae_fast/_C-torch<version><EXT_SUFFIX>
        assert target.name.startswith("_C"), target
        out_dir = target.parent
        build_temp = Path(self.build_temp) / target.name.removesuffix(sysconfig.get_config_var("EXT_SUFFIX") or "")
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("VMAE_FAST_BUILD_TYPE", "Release")
        cmake = _cmake() or "cmake"
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DVMAE_FAST_OUTPUT_DIR={out_dir}",
            # CMake names the library "_C" + this suffix: the torch-versioned name above
            f"-DVMAE_FAST_EXT_SUFFIX={target.name[len('_C'):]}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            # saves CMake a second `import torch`
            f"-DTORCH_ROOT={Path(torch.__file__).resolve().parent}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION={torch.__version__}",
        ]
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = str(min(os.cpu_count() or 1, 4))  # one or two translation units
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)
        if not target.is_file():
            raise RuntimeError(f"CMake did not produce {target}")


setup(
    ext_modules=[CMakeExtension("vmae_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
