"""The import structure of the tree.

* Direction: the library ``vmae_fast`` (its user tools ``vmae_fast.tools`` included) imports
  neither ``train`` nor ``bench``, and ``train`` does not import ``bench``
  (``library <- tools``, ``library <- train <- bench``); every import counts, inside functions too.
* No import circle among the modules of ``vmae_fast/``, ``train/`` and ``bench/``.
* ``vmae_fast.checkpoint`` (format level: files, wrappers, atomic writes) never imports the models,
  and every module imports in a fresh interpreter whichever comes first."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from importlib import import_module
from pathlib import Path

import pytest

import vmae_fast

PKG = Path(vmae_fast.__file__).resolve().parent
ROOT = PKG.parent
ROOMS = ("vmae_fast", "train", "bench")


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three rooms (a package: its __init__)."""
    out = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _import_nodes(tree: ast.AST):
    """Every ``import`` / ``from ... import`` of a module, in functions too, but not those under
    ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``name`` is a module of the tree's package ``package`` (a ``.py`` file, a folder or
    a compiled extension such as ``vmae_fast._C``) rather than a name defined in it."""
    folder = ROOT.joinpath(*package.split("."))
    return folder.is_dir() and ((folder / name).is_dir() or any(folder.glob(f"{name}.*")))


def _imported_names(path: Path, name: str) -> set[str]:
    """Every module the imports of ``path`` (module ``name``) load, relative ones resolved:
    ``from m import x`` is ``m.x`` when ``x`` is a module of the tree, else ``m``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
        out |= {f"{mod}.{a.name}" if _is_submodule(mod, a.name) else mod for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of the three rooms it imports (``import a.b`` counts as ``a.b``; an
    import of something outside the rooms, a compiled extension say, is left out)."""
    files = _module_files()
    return {name: {m for m in _imported_names(path, name) if m in files and m != name}
            for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that import each other (strongly connected
    components of more than one module), as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(set(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:  # a shortest way back to the group's first module, by breadth-first search
        start = min(group)
        prev, frontier = {start: None}, [start]
        while start not in [w for v in frontier for w in graph[v] if w in group] and frontier:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in sorted(prev) if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        circles.append([start] + path[::-1][1:] + [start] if path[-1] == start else path[::-1] + [start])
    return circles




def test_library_imports_neither_train_nor_bench():
    files = _module_files()
    wrong = {}
    for name, path in files.items():
        room = name.split(".")[0]
        banned = {"vmae_fast": ("train", "bench"), "train": ("bench",), "bench": ()}[room]
        bad = sorted(m for m in _imported_names(path, name) if m.split(".")[0] in banned)
        if bad:
            wrong[str(path.relative_to(ROOT))] = bad
    assert not wrong, f"imports against library <- tools, library <- train <- bench: {wrong}"


def test_no_import_circle():
    graph = _graph()
    circles = _cycles(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_circles():
    """The finder itself, on a made-up graph: a 3-circle and a 2-circle found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_console_scripts_are_callables():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"vmae-predict", "vmae-extract-features", "vmae-visualize"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), name


def test_checkpoint_module_does_not_import_models():
    mods = _imported_names(PKG / "checkpoint.py", "vmae_fast.checkpoint")
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


def test_import_does_not_pay_for_timm_and_the_registry_registers_every_arch():
    # timm costs seconds of imports: only the explicit registry module imports it, and it
    # registers both models of every arch (its entry functions are written out, one per name).
    r = _python("import sys, vmae_fast\n"
                "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules, 'timm imported eagerly'\n"
                "import timm\n"
                "assert not timm.list_models('vmae_fast*'), 'registered without the registry module'\n"
                "import vmae_fast.models.timm_registry as reg\n"
                "want = {p + a for a in vmae_fast.ARCHS for p in ('vmae_fast_', 'vmae_fast_pretrain_')}\n"
                "got = set(timm.list_models('vmae_fast*'))\n"
                "assert got == want, sorted(want ^ got)\n"
                "assert all(getattr(reg, n).__module__ == reg.__name__ for n in want)\n")
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
    leaf = _imported_names(PKG / "hf_keys.py", "vmae_fast.hf_keys")
    assert not [m for m in leaf if m.startswith(("vmae_fast.models", "vmae_fast.hf"))], leaf
    for path in sorted((PKG / "models").glob("*.py")):
        mods = _imported_names(path, "vmae_fast.models" + ("" if path.stem == "__init__" else f".{path.stem}"))
        assert not [m for m in mods if m == "vmae_fast.hf" or m.startswith("vmae_fast.hf.")], (path.name, mods)
    assert "vmae_fast.hf_keys" in _imported_names(PKG / "models" / "common.py", "vmae_fast.models.common")
