"""The environment switches (``vmae_fast.envs``), the explicit kernel context, the one uint8
normalization."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast import envs, ops
from vmae_fast.config import IMAGENET_MEAN, IMAGENET_STD


def test_switches_are_read_at_access(monkeypatch):
    monkeypatch.delenv("VMAE_FAST_KERNELS", raising=False)
    assert envs.VMAE_FAST_KERNELS is True
    for off in ("0", "false", "off"):
        monkeypatch.setenv("VMAE_FAST_KERNELS", off)
        assert envs.VMAE_FAST_KERNELS is False
    monkeypatch.setenv("VMAE_FAST_ATTN", "math")
    assert envs.VMAE_FAST_ATTN == "math" and envs.snapshot()["VMAE_FAST_ATTN"] == "math"
    with pytest.raises(AttributeError, match="VMAE_FAST_NOPE"):
        envs.VMAE_FAST_NOPE  # noqa: B018


@pytest.mark.parametrize("text, value", [("1", True), ("ON", True), ("Yes", True), ("TRUE", True), (" on ", True),
                                         ("0", False), ("OFF", False), ("No", False), ("FALSE", False), ("", True)])
def test_switch_words_in_any_case(monkeypatch, text, value):
    monkeypatch.setenv("VMAE_FAST_KERNELS", text)
    assert envs.VMAE_FAST_KERNELS is value


@pytest.mark.parametrize("text", ["2", "of", "enable", "-1"])
def test_a_value_that_is_no_switch_word_is_one_usage_line(monkeypatch, text):
    from vmae_fast.errors import UsageError

    monkeypatch.setenv("VMAE_FAST_NO_EXT", text)
    with pytest.raises(UsageError) as info:
        envs.VMAE_FAST_NO_EXT  # noqa: B018
    msg = str(info.value)
    assert "\n" not in msg and f"VMAE_FAST_NO_EXT={text!r}" in msg and "1/true/yes/on" in msg
    assert envs.snapshot()["VMAE_FAST_NO_EXT"] == text  # a report of the environment still works


def test_torchrun_numbering(monkeypatch):
    from vmae_fast.errors import UsageError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (envs.RANK, envs.WORLD_SIZE, envs.LOCAL_RANK) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (envs.RANK, envs.WORLD_SIZE) == (3, 4)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(UsageError, match="WORLD_SIZE='four'"):
        envs.WORLD_SIZE  # noqa: B018


def test_a_bad_debug_switch_is_reported_without_a_traceback(monkeypatch, capsys):
    from vmae_fast.errors import EXIT_USAGE
    from vmae_fast.cli import run_cli

    monkeypatch.setenv("VMAE_FAST_DEBUG", "maybe")
    assert run_cli(lambda argv: envs.VMAE_FAST_DEBUG, "prog", []) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VMAE_FAST_DEBUG='maybe'" in err and "Traceback" not in err


def test_use_kernels_overrides_the_environment_and_restores(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    with ops.use_kernels(False):
        assert not ops.kernels_enabled()
        with ops.use_kernels(True):
            assert ops.kernels_enabled()
        assert not ops.kernels_enabled()
    assert ops.kernels_enabled()
    monkeypatch.setenv("VMAE_FAST_KERNELS", "0")
    assert not ops.kernels_enabled()


def _op_calls():
    """Each public fused op with small valid arguments (the model's own call shapes)."""
    video = torch.randn(2, 3, 4, 16, 16)
    vis, dec = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[1, 2], [0, 3]])
    D = 6
    return {
        "gather_cubes": lambda: ops.gather_cubes(video, vis, tubelet=2, patch=8),
        "decoder_input": lambda: ops.decoder_input(torch.randn(2, 2, D), torch.randn(4, D),
                                                   torch.randn(1, 1, D), vis, dec),
        "masked_mse_loss": lambda: ops.masked_mse_loss(torch.randn(2, 2, 384), video, dec,
                                                       torch.ones(2, 2), tubelet=2, patch=8),
    }


@pytest.mark.parametrize("op", ["gather_cubes", "decoder_input", "masked_mse_loss"])
def test_kernel_switch_decides_whether_the_op_runs(monkeypatch, op):
    """The registered op (the kernels' entry) is called with the kernels on and never with them
    off, through ``use_kernels`` or ``VMAE_FAST_KERNELS``: a spy, not a comparison of values
    (the native ops are bit-exact with the references, so equal values prove nothing)."""
    calls = []

    def spy(*args):
        calls.append(op)
        raise RuntimeError("kernel ran")

    monkeypatch.setattr(torch.ops.vmae_fast, op, spy, raising=False)
    call = _op_calls()[op]
    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    with pytest.raises(RuntimeError, match="kernel ran"):
        call()
    assert calls == [op]
    with ops.use_kernels(False):
        call()
    monkeypatch.setenv("VMAE_FAST_KERNELS", "0")
    call()
    with ops.use_kernels(True), pytest.raises(RuntimeError, match="kernel ran"):
        call()
    assert calls == [op, op]


def test_library_code_does_not_write_the_environment():
    import pathlib
    root = pathlib.Path(vmae_fast.__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for d in ("vmae_fast", "bench", "train") for p in (root / d).rglob("*.py")
                 if "os.environ[" in p.read_text() or "os.environ.pop" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("channel_dim", [1, 2])
def test_normalize_uint8(channel_dim):
    shape = [2, 5, 3, 4] if channel_dim == 2 else [2, 3, 4, 5]
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    got = ops.normalize_uint8(x, channel_dim=channel_dim)
    assert got.dtype == torch.float32
    for c in range(3):
        xc = x.select(channel_dim, c).double()
        want = (xc / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(got.select(channel_dim, c).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value, skipped", [("1", True), ("yes", True), ("OFF", False), ("0", False),
                                            ("off", False), ("false", False), ("", False)])
def test_the_build_reads_no_ext_as_the_library_does(monkeypatch, value, skipped):
    """setup.py decides whether to build vmae_fast._C by ``envs.VMAE_FAST_NO_EXT``'s own rule, so
    ``VMAE_FAST_NO_EXT=off`` builds it and the library then does not call it opted out."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "setup.py"
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                                              and getattr(n.value.func, "id", "") == "setup")]
    scope = {"__file__": str(path), "__name__": "setup_under_test"}
    exec(compile(tree, str(path), "exec"), scope)  # the build script's functions, without building
    monkeypatch.setenv("VMAE_FAST_NO_EXT", value)
    assert (scope["_skip_reason"]() == "VMAE_FAST_NO_EXT is set") is skipped
    assert envs.VMAE_FAST_NO_EXT is skipped


def test_imagenet_stats_made_while_tracing_are_not_kept():
    """A trace (torch.export, torch.onnx.export) that first asks for the stats gets fake tensors;
    kept, every later eager call would get them too and return fake outputs."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from vmae_fast.ops import _common

    _common._STATS.clear()
    with FakeTensorMode():
        fake_mean, _ = _common.imagenet_stats("cpu")
    assert isinstance(fake_mean, FakeTensor)
    mean, std = _common.imagenet_stats("cpu")
    assert not isinstance(mean, FakeTensor) and mean.tolist() == pytest.approx(list(IMAGENET_MEAN))
    assert _common.imagenet_stats("cpu")[0] is mean  # made once, then kept
