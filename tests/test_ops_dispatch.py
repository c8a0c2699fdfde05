"""The ops' small dispatch helpers, each against values written out by hand (they were reached
only through the Triton launchers, which run in the interpreter process alone)."""
import re

import pytest
import torch

from vmae_fast import ops
from vmae_fast.ops import _common, _dispatch, use_kernels


@pytest.mark.parametrize("x,want", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (768, 1024), (1024, 1024)])
def test_next_pow2(x, want):
    assert _dispatch.next_pow2(x) == want


def test_revalidate(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_DEBUG", "0")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _dispatch.revalidate(False, cuda) is True   # called directly: nobody checked yet
    assert _dispatch.revalidate(True, cpu) is True     # free on CPU
    assert _dispatch.revalidate(True, cuda) is False   # the wrapper checked; no device sync
    monkeypatch.setenv("VMAE_FAST_DEBUG", "1")
    assert _dispatch.revalidate(True, cuda) is True


def test_native_op_names_a_loaded_op_or_none():
    assert _dispatch.native_op("no_such_op_cpu") is None
    ops = _dispatch._native.native_ops()
    if ops is None:
        pytest.skip("vmae_fast._C is not built here: no native op to name")
    assert _dispatch.native_op("gather_cubes_cpu") is torch.ops.vmae_fast.gather_cubes_cpu


def test_check_device_and_kernel_device():
    t = torch.zeros(1)
    _dispatch.check_device("x", t, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^x is on cpu, expected meta \(the device of the first input\)$"):
        _dispatch.check_device("x", t, torch.device("meta"))
    if _dispatch.HAS_TRITON:
        _dispatch.check_kernel_device(torch.device("cpu"))
        _dispatch.check_kernel_device(torch.device("cuda"))
    with pytest.raises(ValueError, match=r"^the Triton kernels run on CUDA tensors .*got tensors on meta$"):
        _dispatch.check_kernel_device(torch.device("meta"))   # meta only while capturing
    with _dispatch.capture_launches():
        _dispatch.check_kernel_device(torch.device("meta"))
    assert _dispatch._capture is None


def test_launch_records_while_capturing_and_refuses_a_compiled_kernel_on_cpu():
    x = torch.zeros(2)
    with _dispatch.capture_launches() as got:
        _dispatch.launch("kern", [3, 1], x, 5, BLOCK=8)
        assert _dispatch._capture is got
    assert _dispatch._capture is None
    assert len(got) == 1
    assert got[0].kernel == "kern" and got[0].grid == (3, 1) and got[0].args[1] == 5
    assert got[0].args[0] is x and got[0].meta == {"BLOCK": 8}
    with pytest.raises(ValueError, match=r"^a Triton kernel on cpu tensors runs only through the Triton "
                                         r"interpreter: set TRITON_INTERPRET=1"):
        _dispatch.launch(object(), (1,), 7, x)   # the device is the first *tensor* argument's


def test_kernel_paths_follow_the_switch():
    with _common.use_kernels(True):
        on = _dispatch.kernel_paths()
        assert on == _dispatch._PATHS and on is not _dispatch._PATHS
    with _common.use_kernels(False):
        off = _dispatch.kernel_paths()
    assert set(off) == set(on) == {"gather_cubes", "decoder_input", "decoder_input_backward",
                                   "masked_mse_loss", "masked_mse_loss_backward"}
    for op, paths in off.items():
        assert set(paths) == set(on[op])
        assert all(v == "reference (kernels disabled: VMAE_FAST_KERNELS=0 or use_kernels(False))"
                   for v in paths.values())


def test_imagenet_stats_values_dtype_and_one_copy_per_device():
    mean, std = _common.imagenet_stats("cpu")
    assert mean.dtype == std.dtype == torch.float32 and mean.device.type == "cpu"
    assert mean.tolist() == torch.tensor([0.485, 0.456, 0.406]).tolist()
    assert std.tolist() == torch.tensor([0.229, 0.224, 0.225]).tolist()
    again = _common.imagenet_stats(torch.device("cpu"))
    assert again[0] is mean and again[1] is std
    assert _common._STATS[torch.device("cpu")] == (mean, std)


def test_normalize_uint8_along_the_last_dim():
    x = torch.tensor([[0, 255, 51]], dtype=torch.uint8)   # (1, C=3): channels last
    got = _common.normalize_uint8(x, channel_dim=1)
    want = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    torch.testing.assert_close(got, torch.tensor([want]), rtol=0, atol=2e-6)
    y = x.T.contiguous()   # (3, 1): channels first
    torch.testing.assert_close(_common.normalize_uint8(y, channel_dim=0), torch.tensor(want)[:, None],
                               rtol=0, atol=2e-6)


class _FakeOp:
    """Records ``register_kernel(device)(impl)`` calls instead of registering anything."""
    def __init__(self):
        self.kernels = {}

    def register_kernel(self, device):
        def put(impl):
            self.kernels[device] = impl
            return impl
        return put


@pytest.mark.skipif(_dispatch.INTERPRETED or not _dispatch.HAS_TRITON,
                    reason="this is the compiled-Triton process's registration (interpreter: its own tests)")
def test_register_kernels_per_device(monkeypatch):
    monkeypatch.setattr(_dispatch, "_PATHS", {})
    native = object()
    monkeypatch.setattr(_dispatch, "native_op", lambda name: native if name == "have_cpu" else None)
    monkeypatch.setattr(_dispatch._native, "unavailable_reason", lambda: None)

    def tri(*a):
        return a

    op = _FakeOp()
    _dispatch.register_kernels(op, "one", triton_impl=tri, native_name="have_cpu")
    assert op.kernels == {"cpu": native, "cuda": tri}
    assert _dispatch._PATHS == {"one": {"cpu": "native", "cuda": "triton"}}

    op = _FakeOp()
    _dispatch.register_kernels(op, "two", triton_impl=tri, native_name="have_cpu", native_impl=lambda f: (f, 1))
    assert op.kernels == {"cpu": (native, 1), "cuda": tri}

    op = _FakeOp()
    _dispatch.register_kernels(op, "three", triton_impl=None, native_name="other_cpu")
    assert op.kernels == {}
    assert _dispatch._PATHS["three"] == {"cpu": "reference (native: the native library has no op other_cpu)",
                                         "cuda": "reference (triton is not installed)"}
    monkeypatch.setattr(_dispatch._native, "unavailable_reason", lambda: "not built")
    _dispatch.register_kernels(_FakeOp(), "four", triton_impl=tri, native_name="other_cpu")
    assert _dispatch._PATHS["four"] == {"cpu": "reference (native: not built)", "cuda": "triton"}
    assert set(_dispatch._PATHS) == {"one", "two", "three", "four"}


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="the interpreter branch needs triton")
def test_register_kernels_in_an_interpreting_process(monkeypatch):
    monkeypatch.setattr(_dispatch, "_PATHS", {})
    monkeypatch.setattr(_dispatch, "INTERPRETED", True)
    op = _FakeOp()

    def tri(*a):
        return a
    _dispatch.register_kernels(op, "one", triton_impl=tri, native_name="gather_cubes_cpu")
    assert op.kernels == {"cpu": tri}
    assert _dispatch._PATHS["one"] == {
        "cpu": "triton (interpreter)",
        "cuda": "reference (this process interprets the Triton kernels: TRITON_INTERPRET=1)"}


def test_check_video_messages_word_for_word():
    ok = torch.zeros(1, 3, 4, 8, 8)
    assert _common.check_video(ok, 2, 4) == (1, 3, 4, 8, 8)
    assert _common.check_video(ok.to(torch.uint8), 2, 4) == (1, 3, 4, 8, 8)
    with pytest.raises(TypeError, match=r"^video must be a torch\.Tensor, got list$"):
        _common.check_video([1], 2, 4)
    with pytest.raises(ValueError, match=r"^video must be a \(B, C, T, H, W\) tensor, got \(3, 4, 8, 8\)$"):
        _common.check_video(ok[0], 2, 4)
    # each of T, H, W alone off the grid is refused (the others divide)
    for shape in [(1, 3, 3, 8, 8), (1, 3, 4, 6, 8), (1, 3, 4, 8, 6)]:
        with pytest.raises(ValueError, match=rf"^video of shape {re.escape(str(shape))} does not divide into "
                                             r"cubes of 2x4x4 \(T % 2, H % 4, W % 4 must be 0\)$"):
            _common.check_video(torch.zeros(shape), 2, 4)
    with pytest.raises(ValueError, match=r"^video must be floating point \(normalized\) or uint8 \(0\.\.255\), "
                                         r"got torch\.int32$"):
        _common.check_video(ok.int(), 2, 4)


def test_check_index_messages_word_for_word():
    _common.check_index(torch.tensor([[0, 7]]), 1, 8, "idx")
    with pytest.raises(TypeError, match=r"^idx must be a torch\.Tensor, got tuple$"):
        _common.check_index((0, 1), 1, 8, "idx")
    with pytest.raises(ValueError, match=r"^idx must be a \(1, n\) integer tensor, got \(2,\)$"):
        _common.check_index(torch.tensor([0, 1]), 1, 8, "idx")
    with pytest.raises(ValueError, match=r"^idx must be a \(1, n\) integer tensor, got \(2, 1\)$"):
        _common.check_index(torch.tensor([[0], [1]]), 1, 8, "idx")   # 2-d, wrong batch
    with pytest.raises(ValueError, match=r"^idx holds token indices in \[0, 8\], expected \[0, 8\)$"):
        _common.check_index(torch.tensor([[0, 8]]), 1, 8, "idx")


def test_normalize_uint8_defaults_to_the_channels_of_a_clip():
    # (B, C=3, T=3, 1, 1): T as long as C, so statistics along the wrong dim still broadcast
    x = torch.tensor([[[0, 51, 255], [255, 0, 51], [51, 255, 0]]], dtype=torch.uint8)[..., None, None]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = torch.tensor([[[(v / 255 - mean[c]) / std[c] for v in (x[0, c, :, 0, 0].tolist())]
                          for c in range(3)]])[..., None, None]
    torch.testing.assert_close(_common.normalize_uint8(x), want, rtol=0, atol=2e-6)


def _public_op_calls():
    """Every public op and its reference, with good arguments by name (a tiny clip, 2 tokens)."""
    video, idx = torch.zeros(1, 3, 2, 8, 8), torch.tensor([[0, 3]])
    z, pos, mt, vis = torch.zeros(1, 1, 4), torch.zeros(4, 4), torch.zeros(4), torch.tensor([[1]])
    pred, w = torch.zeros(1, 2, 3 * 2 * 4 * 4), torch.ones(1, 2)
    cube = dict(tubelet=2, patch=4)
    return [(ops.gather_cubes, dict(video=video, idx=idx), cube),
            (ops.gather_cubes_ref, dict(video=video, idx=idx), cube),
            (ops.cube_targets_ref, dict(video=video, idx=idx), cube),
            (ops.decoder_input, dict(z=z, pos=pos, mask_token=mt, visible_idx=vis, decoder_idx=idx), {}),
            (ops.decoder_input_ref, dict(z=z, pos=pos, mask_token=mt, visible_idx=vis, decoder_idx=idx), {}),
            (ops.masked_mse_loss, dict(pred=pred, video=video, decoder_idx=idx, weight=w), cube),
            (ops.masked_mse_loss_ref, dict(pred=pred, video=video, decoder_idx=idx, weight=w), cube)]


@pytest.mark.parametrize("kernels", [True, False])
def test_public_ops_name_an_argument_that_is_not_a_tensor(kernels):
    """A list (or None) for any tensor argument of a public op is a TypeError that names the
    argument, before any work: not an AttributeError from deep inside."""
    for op, tensors, rest in _public_op_calls():
        with use_kernels(kernels):
            op(**tensors, **rest)  # the good call runs
        for name, t in tensors.items():
            for bad in (t.tolist(), None):
                with use_kernels(kernels), pytest.raises(TypeError) as err:
                    op(**(tensors | {name: bad}), **rest)
                assert str(err.value) == f"{name} must be a torch.Tensor, got {type(bad).__name__}", (op, name)
