"""No import cycle between ``vmae_fast.checkpoint`` (format level: files, wrappers, atomic
writes) and ``vmae_fast.models`` (key adaptation beside each model): checkpoint.py never imports
the models, not even inside a function, and every module imports in a fresh interpreter whichever
comes first."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vmae_fast

PKG = Path(vmae_fast.__file__).resolve().parent


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` anywhere in the file (functions included) names, resolved."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # ``from . import models``
    return out


def test_checkpoint_module_does_not_import_models():
    mods = _imported_modules(PKG / "checkpoint.py", "vmae_fast")
    assert not [m for m in mods if m == "vmae_fast.models" or m.startswith("vmae_fast.models.")], mods


# Runs with a bare ``vmae_fast`` package (its __init__, which imports everything, skipped), so the
# order given is the order the modules really import in.
_SCRIPT = textwrap.dedent("""
    import importlib, sys, types
    pkg = types.ModuleType("vmae_fast")
    pkg.__path__ = [{pkg!r}]
    sys.modules["vmae_fast"] = pkg
    first, rest = {first!r}, {rest!r}
    importlib.import_module(first)
    if first == "vmae_fast.checkpoint":
        import tempfile, torch
        from vmae_fast import checkpoint as ck
        with tempfile.TemporaryDirectory() as d:  # the whole file path, lazy imports included
            ck.save_atomic({{"model": {{"module.blocks.0.w": torch.zeros(1)}}}}, d + "/a.pth")
            ck.guess_format(ck.unwrap_state_dict(ck.load_checkpoint_file(d + "/a.pth")))
        loaded = sorted(m for m in sys.modules if m.startswith("vmae_fast."))
        assert not [m for m in loaded if m.startswith("vmae_fast.models")], loaded
    for m in rest:
        importlib.import_module(m)
    from vmae_fast.models import VideoMAEv2Classifier, VideoMAEv2Pretrain
    assert callable(VideoMAEv2Pretrain.load_official_state_dict)
    assert callable(VideoMAEv2Classifier.official_state_dict)
    print("ok")
""")

MODULES = ["vmae_fast.checkpoint", "vmae_fast.models", "vmae_fast.models.common", "vmae_fast.models.pretrain",
           "vmae_fast.models.classifier"]


@pytest.mark.parametrize("first", MODULES)
def test_fresh_interpreter_import_orders(first):
    rest = [m for m in MODULES if m != first] + ["vmae_fast.models.factory", "vmae_fast.models.load", "vmae_fast.hf", "vmae_fast.reference"]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(pkg=str(PKG), first=first, rest=rest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_import_does_not_pay_for_timm_and_registers_when_timm_comes():
    r = _python("import sys, vmae_fast\n"
                "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules, 'timm imported eagerly'\n"
                "import timm\n"
                "assert 'vmae_fast_vit_small_patch16_224' in timm.list_models('vmae_fast*')\n")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _python("import timm, vmae_fast\nassert len(timm.list_models('vmae_fast*')) == 2 * len(vmae_fast.ARCHS)\n")
    assert r.returncode == 0, r.stderr[-3000:]


def test_opting_out_of_the_extension_gives_no_warning():
    # -W error::RuntimeWarning: the "extension unavailable" warning would fail the import.
    r = _python("import vmae_fast\nfrom vmae_fast.ops import _dispatch\n"
                "assert _dispatch.kernel_paths()['gather_cubes']['cpu'].startswith('reference (native: VMAE_FAST_NO_EXT')\n",
                VMAE_FAST_NO_EXT="1")
    assert r.returncode == 0, r.stderr[-3000:]


def test_hf_key_mapping_is_a_leaf_below_the_models():
    # hf_keys knows key names only; the models import it, and only vmae_fast.hf (which builds
    # models from HF weights) sits above both: no model file imports vmae_fast.hf, not even lazily.
    leaf = _imported_modules(PKG / "hf_keys.py", "vmae_fast")
    assert not [m for m in leaf if m.startswith(("vmae_fast.models", "vmae_fast.hf"))], leaf
    for path in sorted((PKG / "models").glob("*.py")):
        mods = _imported_modules(path, "vmae_fast.models")
        assert not [m for m in mods if m == "vmae_fast.hf" or m.startswith("vmae_fast.hf.")], (path.name, mods)
    assert "vmae_fast.hf_keys" in _imported_modules(PKG / "models" / "common.py", "vmae_fast.models")
