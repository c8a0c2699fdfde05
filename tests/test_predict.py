"""vmae-predict (vmae_fast.tools.predict): the official multi-view test protocol (clip starts, resize, crops, softmax
average) on hand-computed cases, and the CLI on a real video with the shipped K400 names."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import vmae_fast
from vmae_fast.errors import UsageError
from vmae_fast.tools import predict as P
from vmae_fast.video import resize as R
from vmae_fast.video import views as V

from conftest import rel_err

VIDEO = str(Path(__file__).resolve().parent / "data" / "carphone_distorted.mp4")  # 176x144, 120 frames


def _clf(num_classes=400):
    torch.manual_seed(0)
    m = vmae_fast.create_model("vit_small_patch16_224", num_classes=num_classes, depth=1, num_frames=4,
                               img_size=32, patch_size=8, head_init_scale=50.0)  # a head large enough to rank
    return m.eval()


def test_views_spec():
    assert V.parse_views("5x3") == (5, 3) and V.parse_views((2, 1)) == (2, 1)
    with pytest.raises(ValueError, match="5x3"):
        V.parse_views("5by3")
    with pytest.raises(ValueError, match="at least 1"):
        V.parse_views("0x3")


def test_clip_indices_follow_the_official_formula():
    # 100 frames, stride 4: 25 frames 0..96; 5 clips of 16, starts int(k * 9 / 4) = 0, 2, 4, 6, 9
    clips = V.clip_frame_indices(100, 16, 4, 5)
    assert [c[0] for c in clips] == [0, 8, 16, 24, 36] and all(len(c) == 16 for c in clips)
    assert clips[4] == list(range(36, 100, 4))
    # too short: 30 frames -> 0..28 (8 frames), the last repeated to 16; every clip the same
    short = V.clip_frame_indices(30, 16, 4, 5)
    assert short[0] == [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8 and all(c == short[0] for c in short)
    assert V.clip_frame_indices(100, 16, 4, 1)[0][0] == 4 * (9 // 2)  # one clip: the middle


def test_resize_and_crops_follow_the_official_formula():
    assert R.resized_size(240, 320, 224) == (224, 298)  # int(224 * 320 / 240)
    assert R.resized_size(320, 240, 224) == (298, 224)
    assert V.crop_offsets(224, 298, 224, 3) == [(0, 0), (0, 37), (0, 74)]  # int(j * 74 / 2)
    assert V.crop_offsets(298, 224, 224, 3) == [(0, 0), (37, 0), (74, 0)]
    assert V.crop_offsets(224, 298, 224, 1) == [(0, 37)]


def test_predict_averages_the_softmax_of_every_view():
    model = _clf(num_classes=6)
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (40, 36, 48, 3), dtype=torch.uint8, generator=g)
    pred = P.predict(model, frames, views="2x3", sampling_rate=2, topk=3, labels=list("abcdef"))
    # by hand: frames 0, 2, .., 38 (20); clips start at 0 and 16; short side 36 -> 32, long int(32*48/36) = 42
    rs = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(32, 42), mode="bilinear",
                                         align_corners=False).round().clamp(0, 255).to(torch.uint8)
    probs = []
    for start in (0, 16):
        clip = rs[list(range(2 * start, 2 * start + 8, 2))]
        for left in (0, 5, 10):
            view = clip[:, :, :, left:left + 32].transpose(0, 1)[None]
            with torch.no_grad():
                probs.append(model(view).softmax(-1)[0])
    want = torch.stack(probs).mean(0)
    assert pred.views == 6 and rel_err(pred.probs, want) < 1e-6
    assert [i for i, _, _ in pred.top] == want.topk(3).indices.tolist()
    assert [label for _, label, _ in pred.top] == [list("abcdef")[i] for i in want.topk(3).indices.tolist()]
    assert abs(pred.probs.sum().item() - 1) < 1e-5


def test_cli_on_a_video_json_and_text(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test video")
    model = _clf()
    ckpt = tmp_path / "ft.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt)
    common = [VIDEO, "--checkpoint", str(ckpt), "--num-frames", "4", "--img-size", "32", "--device", "cpu"]
    assert P.main(common + ["--json", "--topk", "3", "--views", "2x2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1 and out[0]["video"] == VIDEO and out[0]["views"] == 4
    top = out[0]["top"]
    k400 = vmae_fast.labels.load_labels("k400")
    assert len(top) == 3 and all(t["label"] == k400[t["index"]] for t in top)
    assert top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"] > 0
    # the same through the function (decoder + protocol), default 5x3 in text mode with a label file
    direct = P.predict(model, VIDEO, views="2x2", topk=3, labels=k400)
    assert [t["index"] for t in top] == [i for i, _, _ in direct.top]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(400)) + "\n")
    assert P.main(common + ["--labels", str(names)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{VIDEO}  (15 views)")
    assert len(re.findall(r"^  [1-5]\. class \d+ +0\.\d{4}$", text, re.M)) == 5
    with pytest.raises(UsageError, match="--labels gives 3 names for a model of 400"):
        (tmp_path / "three.txt").write_text("a\nb\nc\n")
        P.main(common + ["--labels", str(tmp_path / "three.txt")])


def test_cli_on_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (test extra)")
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test video")
    cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=48, num_hidden_layers=1,
                                      num_attention_heads=3, intermediate_size=192, num_labels=3,
                                      id2label={0: "zero", 1: "one", 2: "two"}, label2id={"zero": 0, "one": 1, "two": 2})
    transformers.VideoMAEForVideoClassification(cfg).save_pretrained(tmp_path / "hf")
    assert P.main([VIDEO, "--checkpoint", str(tmp_path / "hf"), "--json", "--views", "1x1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {t["label"] for t in out[0]["top"]} == {"zero", "one", "two"}  # the folder's id2label


def test_the_training_evaluation_takes_the_same_views():
    """``vmae-finetune --eval`` (``VideoDataset(mode="test")``) and ``predict`` build their views
    with one function, so the evaluation's top-1 is over the official views too."""
    from train.data import VideoDataset
    from vmae_fast.video import Entry, VideoSource

    entry = Entry(path=VIDEO, label=3)
    ds = VideoDataset([entry], "test", num_frames=8, sampling_rate=3, img_size=64, num_segments=3,
                      num_crops=2, decoder="pyav")
    sample = ds[0]
    src = VideoSource(entry, "pyav")
    try:
        want = V.make_views(src.get, len(src), num_frames=8, img_size=64, sampling_rate=3, views=(3, 2))
    finally:
        src.close()
    assert sample["label"] == 3 and len(sample["video"]) == 6
    assert torch.equal(torch.stack(sample["video"]), want)


def test_cli_a_bad_video_is_one_line_and_the_others_complete(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test video")
    ckpt = tmp_path / "ft.pth"
    torch.save({"model": _clf(num_classes=3).state_dict()}, ckpt)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    common = ["--checkpoint", str(ckpt), "--num-frames", "4", "--img-size", "32", "--device", "cpu", "--views", "1x1"]
    assert P.main([str(bad), VIDEO, "--json"] + common) == 1  # EXIT_SOME_FAILED
    captured = capsys.readouterr()
    assert [r["video"] for r in json.loads(captured.out)] == [VIDEO]
    err = captured.err.strip().splitlines()
    assert err[0].startswith("device cpu, dtype ")  # the first line: which device and dtype, and why
    assert len(err) == 3 and err[1].startswith(f"vmae-predict: skipping {bad}: "), err
    assert err[2] == "vmae-predict: 1 of 2 videos failed (each named above); 1 classified"
    # the console script: a usage error is one line and exit status 2, before any video is read
    with pytest.raises(SystemExit) as stop:
        P.cli([VIDEO, "--checkpoint", str(tmp_path / "missing.pth")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"vmae-predict: error: --checkpoint {tmp_path / 'missing.pth'}: no such file or folder\n"
