"""The training CLIs fail early: each bad input ends the run with one line on stderr (exit 2),
before the output folder exists. No video is decoded here: lists name files that are never
opened, since every check comes before the first batch."""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import vmae_fast
from train import finetune, pretrain
from train.cli import _our_frame, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_small_patch16_224", "--model-overrides",
        "depth=2,embed_dim=64,num_heads=2,decoder_embed_dim=32,decoder_num_heads=2,patch_size=8",
        "--decoder-depth", "1", "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32",
        "--num-workers", "0", "--no-progress", "--batch-size", "2", "--num-sample", "2", "--steps", "3"]
TINY_CLF = ["--model", "vit_small_patch16_224", "--model-overrides", "depth=2,embed_dim=64,num_heads=2,patch_size=8",
            "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32", "--num-workers", "0", "--no-progress",
            "--batch-size", "2", "--num-sample", "2"]


@pytest.fixture
def lists(tmp_path):
    pt, ft = tmp_path / "pretrain.txt", tmp_path / "train.txt"
    for i in range(8):  # present (the lists are checked whole), never opened
        (tmp_path / f"v{i}.mp4").touch()
    pt.write_text("".join(f"{tmp_path}/v{i}.mp4 0 -1\n" for i in range(8)))
    ft.write_text("".join(f"{tmp_path}/v{i}.mp4 {i % 4}\n" for i in range(8)))
    return {"pretrain": str(pt), "train": str(ft)}


def read_only_dir(tmp_path) -> Path:
    """A folder no file can be made in. Root ignores permission bits, so there it is sysfs,
    which refuses new files even to root."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    if Path("/sys/kernel").is_dir():
        return Path("/sys/kernel")
    pytest.skip("running as root without sysfs: no folder here refuses root a new file")


def one_error_line(capsys, main, prog, argv) -> str:
    rc = run_cli(main, prog, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "36"], "error: --img-size 36: img_size=36 is not divisible by patch_size=8"),
    (["--num-frames", "3"], "error: --num-frames 3: num_frames=3 is not divisible by tubelet_size=2"),
    (["--drop-path", "1.5"], "error: --drop-path 1.5: drop_path_rate must be in [0, 1), got 1.5"),
    (["--model-overrides", "depth=2,embed_dim=64,num_heads=3,patch_size=8"],
     "error: --model-overrides 'depth=2,embed_dim=64,num_heads=3,patch_size=8': embed_dim=64 is not divisible "
     "by its number of heads 3"),
    (["--img-size", "24"], "needs an even token grid, got H/p=3, W/p=3 (--img-size 24 / patch 8 gives 3x3"),
    (["--decoder-ratio", "0.3"], "decoder_ratio must be 0.25, 0.5 or 0.75 (or 0 for encoder-only masking), got 0.3"),
    (["--encoder-ratio", "1.5"], "--encoder-ratio must be in [0, 1), got 1.5"),
    (["--model-overrides", "depth=2,wings=3"], "unknown model option(s) ['wings']"),
    (["--resume", "/nonexistent/checkpoint-last.pt"], "--resume /nonexistent/checkpoint-last.pt: no such checkpoint"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--divergence-factor", "0.5"], "--divergence-factor must be > 1"),
    # these were tracebacks (torch's ValueError, numpy's on a negative seed) before
    (["--betas", "1.5", "0.9"], "error: --betas takes two numbers in [0, 1), got 1.5 0.9"),
    (["--eps", "-1"], "error: --eps must be >= 0, got -1.0"),
    (["--seed", "-5"], "error: --seed must be >= 0, got -5"),
    (["--decoder-depth", "-1"], "error: --decoder-depth -1: decoder_depth must be >= 0, got -1"),
])
def test_pretrain_bad_input_is_one_line_and_creates_nothing(lists, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(out), *TINY, *extra])
    assert message in line
    assert not out.exists()


def test_read_only_output_dir(lists, tmp_path, capsys):
    ro = read_only_dir(tmp_path)
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(ro / "run"), *TINY])
    assert f"--output-dir {ro / 'run'}: cannot write in {ro}" in line
    f = tmp_path / "file"
    f.write_text("")
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(f / "run"), *TINY])
    assert f"{f} is not a folder" in line


def test_bad_list_line_names_file_and_line(tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0 -1\nb.mp4 zero -1\n")
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", str(lst), "--output-dir", str(tmp_path / "run"), *TINY])
    assert "list.txt:2:" in line and not (tmp_path / "run").exists()


def test_too_few_videos_for_one_step(lists, tmp_path, capsys):
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(tmp_path / "run"), *TINY,
                           "--batch-size", "16"])
    assert "fewer than one optimizer step needs" in line and not (tmp_path / "run").exists()


def test_tensorboard_missing_fails_early(lists, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("train.cli.tensorboard_available", lambda: False)
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(tmp_path / "run"), *TINY,
                           "--tensorboard"])
    assert "the tensorboard package is not installed" in line


def test_fresh_run_refuses_to_overwrite_a_checkpoint(lists, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pt").write_bytes(b"x")
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(out), *TINY])
    assert "holds the checkpoint of an earlier run" in line and "--resume auto" in line


def test_resume_auto_names_a_checkpoint_of_the_other_layout(lists, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-latest.txt").write_text("checkpoint-step00000003.dcp")
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(out), *TINY, "--resume", "auto"])
    assert "holds a sharded (FSDP) checkpoint (checkpoint-latest.txt); resume it with --dist fsdp" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-latest.txt"]


def test_resume_refuses_another_model_config_naming_the_fields(lists, tmp_path, capsys):
    cfg = vmae_fast.config_for("vit_small_patch16_224", depth=3, embed_dim=64, num_heads=2, decoder_embed_dim=32,
                               decoder_num_heads=2, patch_size=8, decoder_depth=1, num_frames=4, img_size=32,
                               drop_path_rate=0.1)
    ck = tmp_path / "old" / "checkpoint-last.pt"
    ck.parent.mkdir()
    torch.save({"task": "pretrain", "step": 3, "config": cfg.to_dict(), "model": {}, "optimizer": {}}, ck)
    out = tmp_path / "run"
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(out), *TINY, "--resume", str(ck)])
    assert "the checkpoint's model differs from this run's (depth 3 -> 2; drop_path_rate 0.1 -> 0.0)" in line
    assert not out.exists()
    plain = tmp_path / "weights.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, plain)
    line = one_error_line(capsys, pretrain.main, "vmae-pretrain",
                          ["--data-list", lists["pretrain"], "--output-dir", str(out), *TINY, "--resume", str(plain)])
    assert "not a checkpoint written by train.pretrain" in line


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0 (to evaluate without training use --eval)"),
    (["--eval"], "--eval needs --val-list"),
    (["--finetune", "/nonexistent.pth"], "--finetune /nonexistent.pth: no such file"),
    (["--batch-size", "3", "--num-sample", "1"], "--batch-size x --num-sample must be even"),
    # these trained without a word before
    (["--smoothing", "1.5"], "error: --smoothing must be in [0, 1), got 1.5"),
    (["--layer-decay", "0"], "error: --layer-decay must be in (0, 1], got 0.0"),
    (["--mixup", "-1"], "error: --mixup must be >= 0, got -1.0"),
    (["--cutmix", "-2"], "error: --cutmix must be >= 0, got -2.0"),
    (["--mixup-prob", "3"], "error: --mixup-prob must be in [0, 1], got 3.0"),
    (["--mixup-switch-prob", "-0.1"], "error: --mixup-switch-prob must be in [0, 1], got -0.1"),
    (["--min-scale", "0"], "error: --min-scale must be in (0, 1], got 0.0"),
    (["--head-drop", "1"], "error: --head-drop must be in [0, 1), got 1.0"),
    (["--model-ema-decay", "2"], "error: --model-ema-decay must be in [0, 1], got 2.0"),
    (["--eval-every", "-1"], "error: --eval-every must be >= 0, got -1"),
])
def test_finetune_bad_input_is_one_line(lists, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = one_error_line(capsys, finetune.main, "vmae-finetune",
                          ["--train-list", lists["train"], "--num-classes", "4", "--output-dir", str(out), *TINY_CLF,
                           *extra])
    assert message in line and not out.exists()


def test_eval_needs_weights_and_a_matching_head(lists, tmp_path, capsys):
    base = ["--val-list", lists["train"], "--num-classes", "4", "--output-dir", str(tmp_path / "run"), *TINY_CLF,
            "--eval"]
    assert "--eval needs the weights to evaluate" in one_error_line(capsys, finetune.main, "vmae-finetune", base)
    clf = vmae_fast.create_model("vit_small_patch16_224", 7, depth=2, embed_dim=64, num_heads=2, patch_size=8,
                                 num_frames=4, img_size=32)
    f = tmp_path / "clf.pth"
    torch.save({"model": clf.official_state_dict()}, f)
    line = one_error_line(capsys, finetune.main, "vmae-finetune", base + ["--finetune", str(f)])
    assert "the file has a 7-class head, --num-classes is 4" in line


def test_the_process_prints_one_line_and_no_traceback(lists, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "train.pretrain", "--data-list", lists["pretrain"], "--output-dir",
                        str(out), *TINY, "--decoder-ratio", "0.3"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith("vmae-pretrain: error: masking: running-cell decoder_ratio must be")
    assert not out.exists()


def test_warnings_name_the_innermost_line_of_our_code():
    torch_file = str(Path(torch.__file__).parent / "utils" / "data" / "_utils" / "fetch.py")
    ours = str(REPO / "train" / "loop.py"), str(REPO / "train" / "data.py")
    stack = [traceback.FrameSummary(ours[0], 250, "_train"), traceback.FrameSummary(torch_file, 52, "fetch"),
             traceback.FrameSummary(ours[1], 290, "__getitem__"), traceback.FrameSummary(torch_file, 60, "x")]
    assert _our_frame(stack) == (os.path.join("train", "data.py"), 290)
    assert _our_frame(stack[:2]) == (os.path.join("train", "loop.py"), 250)
    assert _our_frame(stack[1:2]) is None


def test_finetune_weights_of_another_width_say_so_in_flags(lists, tmp_path, capsys):
    """(The library's message suggested its exclude= keyword, which no flag sets.)"""
    other = vmae_fast.create_model("vit_small_patch16_224", 4, depth=2, embed_dim=32, num_heads=2, patch_size=8,
                                   num_frames=4, img_size=32)
    f = tmp_path / "narrow.pth"
    torch.save({"model": other.official_state_dict()}, f)
    line = one_error_line(capsys, finetune.main, "vmae-finetune",
                          ["--train-list", lists["train"], "--num-classes", "4", "--output-dir", str(tmp_path / "run"),
                           *TINY_CLF, "--finetune", str(f)])
    assert line.startswith(f"vmae-finetune: error: --finetune {f}: its tensors do not fit this model (another "
                           "--model, --model-overrides, --num-frames or --img-size?): patch_embed.proj.weight: file "
                           "(32, 3, 2, 8, 8) vs model (64, 3, 2, 8, 8); "), line
    assert line.endswith(" more") and "exclude=" not in line


@pytest.mark.parametrize("world", [1, 2])
def test_a_rank_of_a_torchrun_group_ends_with_os_exit_and_its_status(world, monkeypatch):
    """Under torchrun the process ends with ``os._exit`` once the run is over (the gloo group an
    FSDP model holds would otherwise abort a rank in the interpreter's teardown now and then);
    a single process exits as usual."""
    from train import cli

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if world > 1:
        with pytest.raises(Exited) as err:
            cli.exit_process(5)
        assert err.value.args == (5,)
    else:
        with pytest.raises(SystemExit) as stop:
            cli.exit_process(5)
        assert stop.value.code == 5
