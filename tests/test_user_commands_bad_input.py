"""The bad-input battery of every user command (vmae-predict, -extract-features, -visualize,
-export, -pretrain, -finetune, vmae-bench): each mistake is exactly one line on stderr, in the
command's own flag words, with no traceback and exit status 2, before any model or video work;
a bad video among good ones is one line, the good ones keep their output, exit status 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vmae_fast
from vmae_fast.errors import EXIT_SOME_FAILED, EXIT_USAGE
from vmae_fast.cli import EXIT_INTERRUPTED, run_cli
from vmae_fast.tools import export, extract_features, predict, visualize

VIDEO = str(Path(__file__).resolve().parent / "data" / "carphone_distorted.mp4")
SMALL = ["--num-frames", "4", "--img-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("battery")
    torch.manual_seed(0)
    kw = dict(depth=1, num_frames=4, img_size=32, patch_size=8)
    torch.save({"model": vmae_fast.create_model("vit_small_patch16_224", num_classes=3, **kw).state_dict()},
               d / "ft.pth")
    torch.save({"model": vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, **kw).state_dict()},
               d / "pt.pth")
    torch.save({"model": vmae_fast.create_model("vit_small_patch16_224", num_classes=3, embed_dim=48, num_heads=3,
                                                **kw).state_dict()}, d / "w48.pth")  # a width of no named arch
    (d / "text.txt").write_text("hello, I am not a checkpoint\n")
    (d / "three.txt").write_text("a\nb\nc\nd\n")
    (d / "broken.mp4").write_bytes(b"not a video")
    (d / "afile").write_text("x")
    (d / "hf_no_weights").mkdir()  # a folder as --checkpoint, with no model.safetensors in it
    (d / "bad.json").write_text('{"a":\n')
    (d / "dir.png").mkdir()  # a folder where an output file is named
    (d / "hf_bad_config").mkdir()  # a transformers-style folder whose config.json is cut off
    (d / "hf_bad_config" / "config.json").write_text("{")
    (d / "hf_bad_config" / "pytorch_model.bin").write_bytes((d / "ft.pth").read_bytes())
    return d


def _sub(argv, d: Path):
    return [str(a).replace("{d}", str(d)) for a in argv]


P, E, V, X = "vmae-predict", "vmae-extract-features", "vmae-visualize", "vmae-export"
MAINS = {P: predict.main, E: extract_features.main, V: visualize.main, X: export.main}
FT, PT = "--checkpoint={d}/ft.pth", "--checkpoint={d}/pt.pth"
CASES = [  # (command, argv, words the line must hold)
    (P, [VIDEO, FT, "--views", "5"], ["--views", "'5'", "5x3"]),
    (P, [VIDEO, FT, "--views", "0x3"], ["--views", "at least 1"]),
    (P, [VIDEO, FT, "--batch-size", "-1"], ["--batch-size must be >= 1, got -1"]),
    (P, [VIDEO, FT, "--topk", "0"], ["--topk must be >= 1, got 0"]),
    (P, [VIDEO, FT, "--sampling-rate", "0"], ["--sampling-rate must be >= 1, got 0"]),
    (P, [VIDEO, FT, "--decoder", "foo"], ["--decoder", "invalid choice: 'foo'"]),
    (P, [VIDEO, FT, "--dtype", "fp8"], ["--dtype", "invalid choice: 'fp8'"]),
    (P, [VIDEO, FT, "--device", "tpu"], ["--device", "'tpu'"]),
    (P, [VIDEO, FT, "--device", "cuda"], ["--device 'cuda'", "CUDA is not available"]),
    (P, [VIDEO, FT, "--dtype", "fp16"], ["--dtype fp16 needs --device cuda"]),
    (P, [VIDEO, "--checkpoint={d}/text.txt"], ["--checkpoint", "text.txt", "not a PyTorch checkpoint",
                                               "found text starting 'hello, I am not a checkpoint'"]),
    (P, [VIDEO, "--checkpoint={d}/missing.pth"], ["--checkpoint", "missing.pth", "no such file"]),
    (P, [VIDEO, PT], ["--checkpoint", "no classification head"]),
    (P, [VIDEO, FT, "--labels", "nope"], ["--labels", "'nope'", "k400"]),
    (P, [VIDEO, FT, "--labels", "{d}/three.txt"], ["--labels gives 4 names for a model of 3 classes"]),
    (P, [VIDEO, FT, "--labels", "{d}/ft.pth"], ["--labels: labels ", "ft.pth: not a text file (expected one name "
                                                "a line, or JSON)"]),
    (P, [VIDEO, FT, "--labels", "{d}/bad.json"], ["--labels: labels ", "bad.json: not valid JSON (Expecting value"]),
    (P, [VIDEO, "--checkpoint={d}/hf_bad_config"], ["--checkpoint ", "hf_bad_config/config.json is not readable "
                                                    "JSON (Expecting property name"]),
    (P, [VIDEO, "--checkpoint={d}/hf_no_weights"], ["--checkpoint: ", "hf_no_weights is a folder without "
                                                    "model.safetensors or pytorch_model.bin"]),
    (P, [VIDEO, FT, "--num-heads", "0"], ["--num-heads must be >= 1, got 0"]),
    (P, [VIDEO, FT, "--num-heads", "5"], ["--num-heads 5: ", "not divisible"]),
    (P, [VIDEO, "--checkpoint={d}/w48.pth"], ["w48.pth: cannot tell the encoder's number of attention heads from the "
                                              "weights (width 48 is none of the named archs'): pass --num-heads"]),
    (P, [VIDEO, FT, "--num-frames", "3"], ["error: --num-frames 3: num_frames=3 is not divisible by tubelet_size=2"]),
    (P, [VIDEO, FT, "--img-size", "30"], ["error: --img-size 30: img_size=30 is not divisible by patch_size=8"]),
    (P, [VIDEO, "--num-frames", "4"], ["--checkpoint", "required"]),
    (P, [VIDEO, FT, "--viewz", "5x3"], ["unrecognized arguments: --viewz"]),
    (E, [VIDEO, FT, "--output-dir={d}/o", "--stride", "0"], ["--stride must be >= 1, got 0"]),
    (E, [VIDEO, FT, "--output-dir={d}/o", "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    (E, [VIDEO, FT, "--output-dir={d}/afile"], ["--output-dir", "afile", "not a folder"]),
    (E, [FT, "--output-dir={d}/o"], ["no videos given"]),
    (E, [FT, "--output-dir={d}/o", "--video-dir={d}/nodir"], ["--video-dir", "nodir", "no such folder"]),
    (E, [FT, "--output-dir={d}/o", "--video-dir={d}/afile"], ["--video-dir ", "afile: not a folder"]),
    (E, [VIDEO, FT, "--output-dir={d}/afile/sub"], ["--output-dir ", "afile/sub: ", "afile is not a folder"]),
    (E, [VIDEO, FT, "--output-dir={d}/o", "--input-norm", "raw"], ["--input-norm", "invalid choice: 'raw'"]),
    (E, [VIDEO, "--checkpoint={d}/text.txt", "--output-dir={d}/o"], ["--checkpoint", "not a PyTorch checkpoint"]),
    (V, [VIDEO, PT, "--encoder-ratio", "1.5"], ["--encoder-ratio must be in [0, 1), got 1.5"]),
    (V, [VIDEO, PT, "--decoder-ratio", "-0.1"], ["--decoder-ratio must be in [0, 1), got -0.1"]),
    (V, [VIDEO, PT, "--mask-type", "cube"], ["--mask-type", "invalid choice: 'cube'"]),
    (V, [VIDEO, PT, "--start", "-1"], ["--start must be >= 0, got -1"]),
    (V, [VIDEO, PT, "--out", "{d}/r.jpg"], ["--out must name a .png file"]),
    (V, [VIDEO, PT, "--out", "{d}/afile/r.png"], ["--out ", "afile/r.png: ", "afile is not a folder"]),
    (V, [VIDEO, PT, "--out", "{d}/dir.png"], ["--out ", "dir.png: is a folder, expected a file name"]),
    (V, [VIDEO, FT], ["--checkpoint", "pretraining checkpoint"]),
    (V, [VIDEO, PT, "--decoder-num-heads", "5"],
     ["error: --decoder-num-heads 5: decoder_embed_dim=192 is not divisible by its number of heads 5"]),
    (X, [FT, "--out={d}/m.onnx", "--input", "int8"], ["--input", "invalid choice: 'int8'"]),
    (X, [FT, "--out={d}/m.pt"], ["--out must name a .onnx file"]),
    (X, [FT, "--out={d}/afile/m.onnx"], ["--out ", "afile/m.onnx: ", "afile is not a folder"]),
    (X, [FT, "--out={d}/m.onnx", "--no-pool"], ["--no-pool applies to --encoder"]),
    (X, ["--checkpoint={d}/text.txt", "--out={d}/m.onnx"], ["--checkpoint", "not a PyTorch checkpoint"]),
    (X, ["--checkpoint={d}/hf_no_weights", "--out={d}/m.onnx"], ["--checkpoint: ", "is a folder without"]),
    (X, [PT, "--out={d}/m.onnx"], ["--checkpoint", "no classification head", "--encoder"]),
]


@pytest.mark.parametrize("prog, argv, words", CASES, ids=[f"{c[0]}:{' '.join(c[1][1:])[:40]}" for c in CASES])
def test_one_line_for_each_mistake(prog, argv, words, files, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda: the same on every machine
    argv = _sub(argv, files)
    if prog != X:  # the small model's options, each unless the case gives its own
        argv += [x for flag, value in zip(SMALL[::2], SMALL[1::2]) if flag not in argv for x in (flag, value)]
    code = run_cli(MAINS[prog], prog, argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == EXIT_USAGE, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert "Traceback" not in captured.err and captured.out == ""  # before any output or work
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (files / "o").exists() or not any((files / "o").iterdir())


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """(Root writes anywhere, so the refusal is faked where the check probes: a temporary file.)"""
    import tempfile

    from vmae_fast.errors import UsageError, check_output

    check_output("--out", tmp_path / "new" / "deeper" / "x.png")  # folders to make: fine
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **kw):
        if str(dir) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(UsageError) as err:
        check_output("--output-dir", tmp_path / "new" / "deeper", folder=True)
    assert str(err.value) == (f"--output-dir {tmp_path}/new/deeper: cannot write in {tmp_path} "
                              "(Permission denied)")


def test_a_bad_video_is_one_line_and_the_good_one_keeps_its_output(files, capsys):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test video")
    bad, missing = str(files / "broken.mp4"), str(files / "missing.mp4")
    code = run_cli(predict.main, P, [bad, VIDEO, missing, f"--checkpoint={files}/ft.pth", "--views", "1x1", "--json",
                                     "--dtype", "fp32"] + SMALL)
    captured = capsys.readouterr()
    assert code == EXIT_SOME_FAILED and [r["video"] for r in json.loads(captured.out)] == [VIDEO]
    skipped = [x for x in captured.err.splitlines() if "skipping" in x]
    assert [x.split(": ")[1] for x in skipped] == [f"skipping {bad}", f"skipping {missing}"]
    assert skipped == [f"{P}: skipping {bad}: not a readable video (FFmpeg: moov atom not found)",
                       f"{P}: skipping {missing}: no such video: {missing}"] and "Traceback" not in captured.err
    assert captured.err.splitlines()[-1] == f"{P}: 2 of 3 videos failed (each named above); 1 classified"
    out = files / "feats"
    code = run_cli(extract_features.main, E, [bad, VIDEO, f"--checkpoint={files}/ft.pth", f"--output-dir={out}",
                                              "--stride", "16", "--no-progress"] + SMALL)
    captured = capsys.readouterr()
    assert code == EXIT_SOME_FAILED and sorted(p.name for p in out.iterdir()) == ["carphone_distorted.npy"]
    assert sum("skipping" in x for x in captured.err.splitlines()) == 1 and "Traceback" not in captured.err


def test_ctrl_c_is_one_line_saying_what_is_kept_and_status_130(files, capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    code = run_cli(interrupted, E, [], kept="what stays")
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED == 130 and err == f"{E}: stopped: interrupted (SIGINT); what stays\n"
    # the tool's own words: Ctrl-C while a video's windows run (its workers are told to stop)
    monkeypatch.setattr(extract_features, "forward_windows", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stop:
        extract_features.cli([VIDEO, f"--checkpoint={files}/ft.pth", f"--output-dir={files}/ctrl-c", "--stride", "16",
                              "--no-progress"] + SMALL)
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 130 and err[-1] == (f"{E}: stopped: interrupted (SIGINT); the feature files written are "
                                                 "whole and kept; the same command goes on with the videos that have none")
    assert not any("Traceback" in x for x in err) and not (files / "ctrl-c" / "carphone_distorted.npy").exists()


TRAIN = [  # parse-time mistakes of the training CLIs, and vmae-bench's
    ("vmae-pretrain", ["--model", "vit_zz", "--output-dir", "{d}/run"], ["--model", "unknown arch 'vit_zz'"]),
    ("vmae-finetune", ["--batch-size", "two", "--output-dir", "{d}/run"], ["--batch-size", "'two'"]),
    ("vmae-finetune", ["--model", "vit_s"], ["--output-dir", "required"]),  # the alias parses; the next error shows
    ("vmae-bench", ["memory", "--arch", "vit_zz"], ["--arch", "unknown arch 'vit_zz'"]),
    ("vmae-bench", ["attention", "--device", "cuda"], ["--device 'cuda'", "CUDA is not available"]),
    ("vmae-bench", ["attention", "--device", "cpu", "--repeats", "0"], ["--repeats must be >= 1, got 0"]),
    ("vmae-bench", ["kernels", "--device", "cpu", "--warmup", "-1"], ["--warmup must be >= 0, got -1"]),
    ("vmae-bench", ["kernels", "--device", "cpu", "--repeats", "-1"], ["--repeats must be >= 1, got -1"]),
    ("vmae-shards", ["--data-list", "{d}/three.txt", "--kind", "pretrainx", "--out", "{d}/sh"],
     ["argument --kind: invalid choice: 'pretrainx'"]),
    ("vmae-shards", ["--data-list", "{d}/three.txt", "--kind", "pretrain", "--out", "{d}/sh", "--workers", "x"],
     ["argument --workers: invalid int value: 'x'"]),
    ("vmae-shards", ["--data-list", "{d}/three.txt", "--kind", "pretrain", "--out", "{d}/sh", "--short-side", "1"],
     ["error: --short-side must be >= 2, got 1"]),
    ("python -m train.make_synthetic", ["--out", "{d}/run", "--n", "1"], ["error: --n must be >= 2, got 1"]),
    ("python -m train.make_synthetic", ["--out", "{d}/afile/run"], ["error: --out ", "afile/run: ", "afile is not a folder"]),
    ("python -m train.make_synthetic", ["--out", "{d}/run", "--width", "33"],
     ["error: --height and --width must be even (H.264 4:2:0), got 48x33"]),
    ("vmae-pretrain", ["--data-list", "{d}/three.txt", "--output-dir", "{d}/run", "--num-workers", "-1"],
     ["error: --num-workers must be >= 0, got -1"]),
    ("vmae-finetune", ["--train-list", "{d}/three.txt", "--num-classes", "3", "--output-dir", "{d}/run",
                       "--min-lr", "-0.5"], ["error: --min-lr must be >= 0, got -0.5"]),
    ("vmae-shards", ["--data-list", "{d}/three.txt", "--kind", "pretrain", "--out", "{d}/sh"],
     ["--data-list: ", "three.txt:1: expected '<path> <start_idx> <total_frames>"]),
    ("vmae-pretrain", ["--data-list", "{d}/three.txt", "--output-dir", "{d}/run", "--lr", "1e-3", "--base-lr", "5e-4"],
     ["error: --lr 0.001 and --base-lr 0.0005: give one"]),
    ("vmae-pretrain", ["--data-list", "{d}/three.txt", "--output-dir", "{d}/run"],
     ["--data-list: ", "three.txt:1: expected '<path> <start_idx> <total_frames>"]),
    ("vmae-finetune", ["--train-list", "{d}/three.txt", "--num-classes", "3", "--output-dir", "{d}/run"],
     ["--train-list: ", "three.txt:1: expected '<path> <label> or <path> <total_frames> <label>'"]),
]


@pytest.mark.parametrize("prog, argv, words", TRAIN, ids=[f"{c[0]}:{' '.join(c[1])[:30]}" for c in TRAIN])
def test_training_and_bench_commands_too(prog, argv, words, files, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _sub(argv, files)
    if prog == "vmae-bench":
        from bench.__main__ import main as bench_main

        with pytest.raises(SystemExit) as stop:
            bench_main(argv)
        code, line_prog = stop.value.code, f"vmae-bench {argv[0]}"
    else:
        from train import finetune, make_synthetic, pretrain, write_shards

        main = {"vmae-pretrain": pretrain.main, "vmae-finetune": finetune.main, "vmae-shards": write_shards.main,
                "python -m train.make_synthetic": make_synthetic.main}
        code = run_cli(main[prog], prog, argv)
        line_prog = prog
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == EXIT_USAGE and len(lines) == 1 and lines[0].startswith(f"{line_prog}: error: "), lines
    assert "Traceback" not in err and all(w in lines[0] for w in words), lines[0]
    assert not (files / "run").exists() and not (files / "sh").exists()  # refused before any output


def test_the_training_clis_take_the_arch_aliases():
    from train import cli

    ap = cli.make_parser("pretrain", "")
    cli.add_common_args(ap, "pretrain")
    for alias, full in vmae_fast.config.ARCH_ALIASES.items():
        assert ap.parse_args(["--model", alias, "--output-dir", "x"]).model == full
    assert ap.parse_args(["--model", "ViT-B", "--output-dir", "x"]).model == "vit_base_patch16_224"


@pytest.mark.parametrize("prog, flag", [("vmae-pretrain", "--resume"), ("vmae-finetune", "--finetune"),
                                        ("vmae-finetune", "--resume")])
def test_a_text_file_as_a_training_checkpoint_is_named(prog, flag, files, tmp_path, capsys):
    from train import finetune, pretrain

    for i in range(8):  # the lists are checked whole, the videos never opened
        (tmp_path / f"v{i}.mp4").touch()
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{tmp_path}/v{i}.mp4 {i % 4}\n" if prog == "vmae-finetune" else
                           f"{tmp_path}/v{i}.mp4 0 -1\n" for i in range(8)))
    common = ["--model", "vit_s", "--num-frames", "4", "--img-size", "32", "--num-workers", "0", "--no-progress",
              "--batch-size", "2", "--steps", "1", "--output-dir", str(tmp_path / "run")]
    if prog == "vmae-pretrain":
        main, argv = pretrain.main, ["--data-list", str(lst), "--decoder-depth", "1", "--model-overrides",
                                     "depth=1,embed_dim=64,num_heads=2,decoder_embed_dim=32,decoder_num_heads=2,"
                                     "patch_size=8", *common]
    else:
        main, argv = finetune.main, ["--train-list", str(lst), "--num-classes", "4", "--model-overrides",
                                     "depth=1,embed_dim=64,num_heads=2,patch_size=8", *common]
    code = run_cli(main, prog, argv + [flag, str(files / "text.txt")])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == EXIT_USAGE and len(lines) == 1 and "Traceback" not in err, lines
    assert "text.txt" in lines[0] and "not a PyTorch checkpoint" in lines[0] and flag in lines[0], lines[0]
