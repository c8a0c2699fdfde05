"""ONNX export (vmae_fast/export.py): the graph under onnxruntime gives PyTorch's logits / features
for batches it was not traced with (dynamic batch), from uint8 and float clips; the CLI end to end."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast.tools import export
from vmae_fast.checkpoint import save_atomic

pytest.importorskip("onnx", reason="ONNX export needs the export extra (onnx, onnxscript)")
pytest.importorskip("onnxscript", reason="ONNX export needs the export extra (onnx, onnxscript)")
pytest.importorskip("onnxruntime", reason="the export test runs the graph under onnxruntime (export extra)")


def _tiny(num_classes=5):
    torch.manual_seed(0)
    m = vmae_fast.create_model("vit_small_patch16_224", num_classes=num_classes, depth=2, num_frames=4,
                               img_size=32, head_init_scale=1.0).eval()
    return m


def _export(model, path, **kw):
    try:
        return export.export_onnx(model, path, **kw)
    except Exception as exc:  # only the oldest torch may lack what the exporter needs
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7):
            pytest.skip(f"torch {torch.__version__}'s dynamo ONNX exporter fails on this model: "
                        f"{type(exc).__name__}: {str(exc)[:200]}")
        raise


@pytest.mark.slow
@pytest.mark.parametrize("input", ["uint8", "float"])
def test_classifier_logits_under_onnxruntime(tmp_path, input):
    model = _tiny()
    path = _export(model, tmp_path / "m.onnx", input=input)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left over
    for batch in (1, 3):
        clip = export.example_clip(model, batch, input, seed=batch)
        with torch.no_grad():
            want = model(clip)
        got = export.run_onnx(path, clip)
        assert got.shape == (batch, 5)
        assert want.abs().max() > 0.1  # a head that gives non-trivial logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_encoder_features_per_token_under_onnxruntime(tmp_path):
    model = _tiny(num_classes=0)
    path = _export(model, tmp_path / "enc.onnx", encoder=True, pool=False)
    clip = export.example_clip(model, 3, "uint8", seed=3)
    with torch.no_grad():
        want = model.forward_features(clip, pool=False)
    got = export.run_onnx(path, clip)
    assert got.shape == (3, 2 * 2 * 2, 384)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_headless_model_is_not_exported_as_a_classifier(tmp_path):
    with pytest.raises(ValueError, match="no classification head"):
        export.export_onnx(_tiny(num_classes=0), tmp_path / "m.onnx")


@pytest.mark.slow
def test_cli_writes_and_checks(tmp_path, capsys):
    ckpt = tmp_path / "ft.pth"
    save_atomic({"model": _tiny().state_dict()}, ckpt)
    out = tmp_path / "out" / "m.onnx"
    try:
        code = export.main(["--checkpoint", str(ckpt), "--out", str(out), "--num-frames", "4", "--img-size", "32"])
    except Exception:
        _export(_tiny(), tmp_path / "probe.onnx")  # skips on the oldest torch if the exporter fails there
        raise
    assert code == 0 and out.is_file()
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("onnxruntime check"))
    assert float(line.rsplit("=", 1)[1]) < 1e-4
