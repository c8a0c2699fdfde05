"""The official recipe, number by number: lr scaling (videos, not clips), the warmup + cosine
schedule, layer-wise lr decay, and every per-model default against the official scripts
(OpenGVLab/VideoMAEv2 scripts/pretrain/vit_*_hybrid_pt.sh, scripts/finetune/vit_*_k400_ft.sh).
No data, no training: each test runs in well under a second."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vmae_fast
from train import finetune, pretrain
from train.cli import UsageError
from train.optim import (autocast, cosine_lr, make_optimizer, make_plan, make_scaler, optimizer_step, param_groups,
                         resolve_precision, set_lr)

S, B, L, H, G = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch16_224",
                 "vit_giant_patch14_224")

# Transcribed from the official scripts (not from train/recipe.py): lr is the script's --lr
# (before scaling), gpus its GPUS default. ViT-S has no official script: ViT-B's values.
PRETRAIN_SCRIPTS = {
    B: dict(base_lr=1e-3, warmup_epochs=20, epochs=200, clip_grad=None, grad_checkpointing=False, gpus=32),
    L: dict(base_lr=1e-3, warmup_epochs=30, epochs=300, clip_grad=None, grad_checkpointing=False, gpus=48),
    H: dict(base_lr=1e-3, warmup_epochs=30, epochs=300, clip_grad=None, grad_checkpointing=True, gpus=64),
    G: dict(base_lr=6e-4, warmup_epochs=30, epochs=300, clip_grad=0.02, grad_checkpointing=True, gpus=64),
}
PRETRAIN_SCRIPTS[S] = PRETRAIN_SCRIPTS[B]
PRETRAIN_ALL = dict(batch_size=32, num_sample=4, min_lr=1e-5, warmup_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95),
                    eps=1e-8, drop_path=0.0, encoder_ratio=0.9, decoder_ratio=0.5, decoder_depth=4, num_frames=16,
                    sampling_rate=4)
FINETUNE_SCRIPTS = {
    B: dict(batch_size=16, base_lr=7e-4, epochs=90, drop_path=0.1, head_drop=0.0, layer_decay=0.75,
            weight_decay=0.05, gpus=32),
    L: dict(batch_size=6, base_lr=2e-3, epochs=35, drop_path=0.2, head_drop=0.0, layer_decay=0.75,
            weight_decay=0.05, gpus=32),
    H: dict(batch_size=4, base_lr=1e-3, epochs=40, drop_path=0.2, head_drop=0.5, layer_decay=0.8,
            weight_decay=0.05, gpus=32),
    G: dict(batch_size=3, base_lr=1e-3, epochs=30, drop_path=0.2, head_drop=0.0, layer_decay=0.9,
            weight_decay=0.1, gpus=64),
}
FINETUNE_SCRIPTS[S] = FINETUNE_SCRIPTS[B]
FINETUNE_ALL = dict(num_sample=2, warmup_epochs=5, min_lr=1e-6, warmup_lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                    clip_grad=None, smoothing=0.1, mixup=0.8, cutmix=1.0, test_num_segment=5, test_num_crop=3,
                    # run_class_finetuning.py's augmentation defaults
                    aa="rand-m7-n4-mstd0.5-inc1", train_interpolation="bicubic", reprob=0.25, remode="pixel",
                    recount=1)


@pytest.fixture
def files(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0 -1\n")
    return {"list": str(lst), "out": str(tmp_path / "out")}


def option(cfg, name):
    """An option of the parsed config: the task's own, or the loop's (``cfg.run``)."""
    return getattr(cfg, name) if hasattr(cfg, name) else getattr(cfg.run, name)


def pretrain_args(files, *extra):
    return pretrain.parse_args(["--data-list", files["list"], "--output-dir", files["out"], *extra])


def finetune_args(files, *extra):
    return finetune.parse_args(["--train-list", files["list"], "--num-classes", "400", "--output-dir", files["out"],
                                *extra])


@pytest.mark.parametrize("model", [S, B, L, H, G])
def test_pretrain_defaults_are_the_official_script(files, model):
    args = pretrain_args(files, "--model", model)
    want = {**PRETRAIN_ALL, **PRETRAIN_SCRIPTS[model]}
    want.pop("gpus")
    assert {k: option(args, k) for k in want} == want
    assert args.run.lr is None and args.run.lr_scaling == "official" and args.run.accum_steps == 1


@pytest.mark.parametrize("model", [S, B, L, H, G])
def test_finetune_defaults_are_the_official_script(files, model):
    args = finetune_args(files, "--model", model)
    want = {**FINETUNE_ALL, **FINETUNE_SCRIPTS[model]}
    want.pop("gpus")
    assert {k: option(args, k) for k in want} == want


def test_an_explicit_option_beats_the_recipe(files):
    args = pretrain_args(files, "--model", G, "--clip-grad", "1.0", "--no-grad-checkpointing", "--num-sample", "1")
    assert (args.run.clip_grad, args.grad_checkpointing, args.run.num_sample, args.run.base_lr) == (1.0, False, 1, 6e-4)


def _plan(batch, num_sample, world, accum, base_lr, min_lr, warmup_lr=0.0, scaling="official", lr=None,
          steps_per_epoch=100):
    args = SimpleNamespace(batch_size=batch, num_sample=num_sample, accum_steps=accum, base_lr=base_lr, lr=lr,
                           min_lr=min_lr, warmup_lr=warmup_lr, lr_scaling=scaling, steps=None, epochs=10,
                           warmup_steps=None, warmup_epochs=1)
    return make_plan(args, world, steps_per_epoch)


def test_official_pretrain_lr_scales_by_videos_not_clips():
    # README's ViT-B example on the official 32 GPUs: 32 videos x 32 GPUs = 1024 -> x4.
    p = _plan(32, 4, 32, 1, 1e-3, 1e-5, 1e-6)
    assert (p.lr, p.min_lr, p.warmup_lr) == pytest.approx((4e-3, 4e-5, 4e-6), rel=1e-12)
    assert (p.videos_per_step, p.clips_per_step) == (1024, 4096)
    assert _plan(32, 1, 32, 1, 1e-3, 1e-5).lr == pytest.approx(4e-3)  # num_sample changes nothing
    # ViT-g: 6e-4 x 32 x 64 / 256
    assert _plan(32, 4, 64, 1, 6e-4, 1e-5).lr == pytest.approx(4.8e-3)
    # one GPU: the same videos per step through accumulation give the same lr
    assert _plan(32, 4, 1, 32, 1e-3, 1e-5).lr == pytest.approx(4e-3)
    # the previous rule, kept as --lr-scaling clips: 4x at num_sample 4, min/warmup lr absolute
    c = _plan(32, 4, 32, 1, 1e-3, 1e-5, 1e-6, scaling="clips")
    assert (c.lr, c.min_lr, c.warmup_lr) == pytest.approx((1.6e-2, 1e-5, 1e-6))
    # --lr: nothing scaled
    a = _plan(32, 4, 32, 1, 1e-3, 1e-5, lr=2e-4)
    assert (a.lr, a.min_lr, a.scaling) == (2e-4, 1e-5, "absolute")


def test_official_finetune_lr_counts_update_freq():
    # ViT-B K400: 16 videos x 32 GPUs x update_freq 1 = 512 -> x2; repeated aug (num_sample 2) not counted
    p = _plan(16, 2, 32, 1, 7e-4, 1e-6)
    assert (p.lr, p.min_lr) == pytest.approx((1.4e-3, 2e-6), rel=1e-12)
    assert _plan(16, 2, 16, 2, 7e-4, 1e-6).lr == pytest.approx(1.4e-3)  # update_freq 2 on 16 GPUs


def test_schedule_is_the_official_cosine_scheduler():
    # warmup = linspace(start, base, warmup), both ends included; then final + (base - final)
    # (1 + cos(pi i / n)) / 2 for i = 0..n-1, n = total - warmup. By hand for base 1, final 0.1:
    got = [cosine_lr(s, 1.0, 0.1, 10, 4, 0.0) for s in range(10)]
    r3 = math.sqrt(3) / 2
    want = [0.0, 1 / 3, 2 / 3, 1.0,                            # warmup
            1.0, 0.1 + 0.45 * (1 + r3), 0.775, 0.55, 0.325, 0.1 + 0.45 * (1 - r3)]  # cosine, i = 0..5
    assert got == pytest.approx(want, abs=1e-12)
    assert cosine_lr(0, 1.0, 0.1, 10, 1, 0.25) == 0.25  # linspace(start, base, 1) is [start]
    # the per-step schedule of a plan: 100 steps per epoch, 1 warmup epoch, 10 epochs
    p = _plan(32, 4, 1, 1, 1e-3, 1e-5)
    assert (p.total_steps, p.warmup_steps) == (1000, 100)
    assert p.lr_at(99) == pytest.approx(p.lr) and p.lr_at(999) > p.min_lr


def test_layer_decay_and_weight_decay_groups():
    model = vmae_fast.create_model(S, 4, depth=2, embed_dim=64, num_heads=2, patch_size=8, num_frames=4, img_size=32)
    groups = param_groups(model, 0.05, layer_decay=0.75, depth=2)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # official get_num_layer_for_vit: patch embed 0, block i -> i+1, the rest depth+1;
    # scale = layer_decay ** (depth + 1 - layer)
    assert scale["patch_embed.proj.weight"] == 0.75 ** 3
    assert scale["blocks.0.attn.qkv.weight"] == 0.75 ** 2 and scale["blocks.1.mlp.fc1.weight"] == 0.75
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["blocks.0.norm1.weight"] == 0.0


def test_weight_decay_skips_tokens_and_tables_by_name():
    """The official recipe keeps ``pos_embed``, ``mask_token`` and ``cls_token`` out of weight decay
    by name, though they are 3-d (every 1-d parameter is out by shape): listed here by hand."""
    model = vmae_fast.create_pretrain_model(S, depth=1, decoder_depth=1, embed_dim=64, num_heads=2,
                                            decoder_embed_dim=32, decoder_num_heads=2, patch_size=8,
                                            num_frames=4, img_size=32, learnable_pos_embed=True)
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 64))  # no VideoMAE model has one; the rule does
    no_decay = {"mask_token", "pos_embed", "encoder.pos_embed", "cls_token"}
    groups = param_groups(model, 0.05)
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert g["weight_decay"] == (0.0 if n in no_decay or p.ndim == 1 else 0.05), n
    named = {n for g in groups for n in g["names"]}
    assert no_decay <= named and "encoder_to_decoder.weight" in named


def test_layer_decay_reads_through_ddp_and_compile_wrappers():
    """DDP names the parameters ``module.*`` and torch.compile ``_orig_mod.*``: the layer rules
    must see the model's own names, or every group gets lr_scale 1 under torchrun."""
    model = vmae_fast.create_model(S, 4, depth=2, embed_dim=64, num_heads=2, patch_size=8, num_frames=4, img_size=32)

    class Wrapper(torch.nn.Module):  # as DistributedDataParallel holds the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    bare = {id(p): g["lr_scale"] for g in param_groups(model, 0.05, 0.75, 2) for p in g["params"]}
    for wrapped in (Wrapper(model), Wrapper(torch.compile(model))):
        got = {id(p): g["lr_scale"] for g in param_groups(wrapped, 0.05, 0.75, 2) for p in g["params"]}
        assert got == bare and len(set(got.values())) == 4


def test_model_overrides_take_every_factory_option(files):
    """--model-overrides takes the classifier's options (cos_attn, qk_scale, ...) as create_model
    does, and still names an unknown one."""
    args = finetune_args(files, "--model-overrides", "cos_attn=True,drop_rate=0.1,depth=2")
    assert args.model_overrides
    with pytest.raises(UsageError, match="unknown model option"):
        finetune_args(files, "--model-overrides", "cos_atn=True")


def test_help_says_which_lr_scaling_runs(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "official (the default; what runs unless --lr is given)" in text
    assert "clips of a video not counted" in text
    assert "vit_giant_patch14_224 base_lr=0.0006 epochs=300 warmup_epochs=30 clip_grad=0.02" in text


def test_readme_tables_are_the_recipe():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Training\n", 1)[1].split("\n## ", 1)[0]
    names = {"ViT-S": S, "ViT-B": B, "ViT-L": L, "ViT-H": H, "ViT-g": G}
    for kind, scripts, common in (("pretraining", PRETRAIN_SCRIPTS, PRETRAIN_ALL),
                                  ("fine-tuning", FINETUNE_SCRIPTS, FINETUNE_ALL)):
        table = section.split(f"| {kind} |", 1)[1].split("\n\n", 1)[0]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
        assert [r[0].split()[0] for r in rows] == list(names)
        for r in rows:
            want = {**common, **scripts[names[r[0].split()[0]]]}
            batch = want["batch_size"]
            peak = _plan(batch, want["num_sample"], want["gpus"], 1, want["base_lr"], 0.0).lr
            assert [int(r[1]), r[2], float(r[3]), float(r[4])] == [want["gpus"], f"{batch} x {want['num_sample']}",
                                                                  want["base_lr"], pytest.approx(peak)], r


# ----------------------------------------------------------------------------- mutation survivors
# Written for the mutants `make mutate` left alive in train/optim.py (README, "Mutation testing").

def _official_cosine_scheduler(base, final, total, warmup, start=0.0):
    """The official utils.cosine_scheduler restated in numpy, per step."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    rest = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, rest))


@pytest.mark.parametrize("warmup, start", [(0, 0.0), (1, 0.0), (2, 0.0), (2, 0.25), (5, 0.1), (9, 0.0)])
def test_cosine_lr_is_the_official_schedule_at_every_step(warmup, start):
    want = _official_cosine_scheduler(1.0, 0.01, 10, warmup, start)
    got = [cosine_lr(s, 1.0, 0.01, 10, warmup, start) for s in range(10)]
    assert got == pytest.approx(want.tolist(), abs=1e-12)
    if start == 0.0:  # the default start of the warmup is 0
        assert [cosine_lr(s, 1.0, 0.01, 10, warmup) for s in range(10)] == got


def test_plan_fields_for_each_lr_rule():
    def args(**kw):
        base = dict(batch_size=4, num_sample=2, accum_steps=3, base_lr=1e-3, lr=None, min_lr=1e-5, warmup_lr=1e-6,
                    lr_scaling="official", steps=None, epochs=5, warmup_steps=None, warmup_epochs=1.5)
        return SimpleNamespace(**(base | kw))

    def same(plan, want):
        got = plan.to_dict()
        assert got.pop("scaling") == want.pop("scaling")
        assert got == pytest.approx(want, rel=1e-12)

    geometry = dict(videos_per_step=4 * 2 * 3, clips_per_step=4 * 2 * 3 * 2, steps_per_epoch=10, total_steps=50,
                    warmup_steps=15)
    f = 24 / 256
    same(make_plan(args(), 2, 10),
         dict(geometry, lr=1e-3 * f, min_lr=1e-5 * f, warmup_lr=1e-6 * f, scaling="official", factor=f))
    fc = 48 / 256
    same(make_plan(args(lr_scaling="clips"), 2, 10),
         dict(geometry, lr=1e-3 * fc, min_lr=1e-5, warmup_lr=1e-6, scaling="clips", factor=fc))
    same(make_plan(args(lr=2e-4, steps=7, warmup_steps=3), 2, 10),
         dict(geometry, total_steps=7, warmup_steps=3, lr=2e-4, min_lr=1e-5, warmup_lr=1e-6, scaling="absolute",
              factor=1.0))
    assert make_plan(args(steps=1), 2, 10).total_steps == 1  # one step is a run
    with pytest.raises(ValueError, match=r"^the run has no steps: --epochs 0 x 10 steps per epoch$"):
        make_plan(args(epochs=0), 2, 10)
    p = make_plan(args(warmup_lr=0.5e-3 / f), 2, 10)  # the plan's lr_at is cosine_lr with its warmup start
    assert [p.lr_at(s) for s in range(50)] == pytest.approx(
        _official_cosine_scheduler(p.lr, p.min_lr, 50, 15, p.warmup_lr).tolist(), abs=1e-15)


def test_param_groups_rules_by_name_and_frozen_parameters():
    model = vmae_fast.create_model(S, 4, depth=2, embed_dim=64, num_heads=2, patch_size=8, num_frames=4, img_size=32,
                                   learnable_pos_embed=True)
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 64))
    model.head.bias = torch.nn.Parameter(torch.zeros(1, 4))  # a 2-d bias: out of decay by its name
    model.patch_embed.proj.weight.requires_grad_(False)  # frozen: skipped, the others still grouped
    plain = param_groups(model, 0.05)
    assert all(g["lr_scale"] == 1.0 for g in plain)
    names = {n: g for g in plain for n in g["names"]}
    assert "patch_embed.proj.weight" not in names and "patch_embed.proj.bias" in names and "head.weight" in names
    assert names["head.bias"]["weight_decay"] == 0.0 and names["head.weight"]["weight_decay"] == 0.05
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.75, depth=2) for n in g["names"]}
    for layer0 in ("pos_embed", "cls_token", "patch_embed.proj.bias"):
        assert scale[layer0] == 0.75 ** 3, layer0


def test_make_optimizer_and_set_lr():
    model = vmae_fast.create_model(S, 4, depth=2, embed_dim=64, num_heads=2, patch_size=8, num_frames=4, img_size=32)
    args = SimpleNamespace(weight_decay=0.05, betas=[0.9, 0.95], eps=1e-6)
    # fused AdamW on CUDA only; the flag alone can be checked here (fused AdamW also runs on CPU)
    assert all(g["fused"] for g in make_optimizer(model, args, torch.device("cuda")).param_groups)
    opt = make_optimizer(model, args, torch.device("cpu"), layer_decay=0.75, depth=2)
    groups = param_groups(model, 0.05, 0.75, 2)
    assert len(opt.param_groups) == len(groups)
    for got, want in zip(opt.param_groups, groups):
        assert "names" not in got and got["params"] == want["params"]
        assert (got["weight_decay"], got["lr_scale"], got["lr"]) == (want["weight_decay"], want["lr_scale"], 0.0)
        assert got["betas"] == (0.9, 0.95) and got["eps"] == 1e-6 and not got["fused"]
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * g["lr_scale"] for g in groups]
    bare = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # a group without lr_scale
    set_lr(bare, 2e-3)
    assert bare.param_groups[0]["lr"] == 2e-3


def test_precision_autocast_and_scaler():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert (resolve_precision("auto", cpu), resolve_precision("auto", cuda)) == ("fp32", "bf16")
    assert resolve_precision("fp16", cpu) == "fp16" and resolve_precision("fp32", cuda) == "fp32"
    with autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(precision, cpu):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    assert [make_scaler(p, cpu).is_enabled() for p in ("fp32", "bf16", "fp16")] == [False, False, True]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_optimizer_step_clips_steps_and_clears(clip, precision):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = make_scaler(precision, torch.device("cpu"))  # fp16: a loss scale of 2**16 to undo
    scaler.scale((w * torch.tensor([1.0, 2.0])).sum().mul(2)).backward()  # grad (2, 4), norm sqrt(20)
    norm = optimizer_step(model, opt, scaler, clip)
    g = torch.tensor([2.0, 4.0])
    if clip is None:
        assert norm is None
    else:
        assert norm.item() == pytest.approx(20 ** 0.5)
        g = g * clip / (20 ** 0.5 + 1e-6)  # clip_grad_norm_'s own epsilon
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - g, rtol=1e-6, atol=0)
    assert w.grad is None


def test_plan_describe_names_the_rule():
    p = _plan(32, 4, 32, 1, 1e-3, 1e-5, 1e-6)
    assert p.describe() == ("lr 0.004 (x4: 1024 videos/256, official scaling), min 4e-05, warmup from 4e-06 over "
                            "100 steps")
    assert _plan(32, 4, 1, 1, 1e-3, 1e-5, scaling="clips").describe().startswith(
        "lr 0.0005 (x0.5: 128 clips/256, --lr-scaling clips), min 1e-05, warmup from 0 over 100 steps")
    assert _plan(32, 4, 1, 1, 1e-3, 1e-5, lr=3e-4).describe().startswith("lr 0.0003 (x1: --lr, not scaled)")


def test_optimizer_step_reads_a_sharded_norm_whole(monkeypatch):
    """Under FSDP2 clip_grad_norm_ returns a DTensor: the step returns its full value."""
    class Sharded:
        def full_tensor(self):
            return torch.tensor(7.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: Sharded())
    w = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.w = w
    w.sum().backward()
    norm = optimizer_step(model, torch.optim.SGD([w], lr=1.0), make_scaler("fp32", torch.device("cpu")), 1.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == 7.0
