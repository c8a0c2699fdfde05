"""The official recipe, per model size: the defaults of ``train.pretrain`` / ``train.finetune``.

Read off OpenGVLab/VideoMAEv2: ``scripts/pretrain/vit_{b,l,h,g}_hybrid_pt.sh`` and
``scripts/finetune/vit_{b,l,h,g}_k400_ft.sh`` (Kinetics-400 fine-tuning), with the defaults of
``run_mae_pretraining.py`` / ``run_class_finetuning.py`` for what a script does not set. The
official repository has no ViT-S script (its ViT-S is distilled from ViT-g): ViT-S takes the
ViT-B values. ``gpus`` is the script's GPU count: the batch is per GPU, and the lr is scaled
by the global batch (``train/optim.py``), so fewer GPUs mean a lower peak lr unless
``--accum-steps`` makes up the difference.

The official scripts' ``warmup_lr`` (1e-6 pretraining, 1e-8 fine-tuning) is scaled with the lr
but never passed to their ``cosine_scheduler``, whose warmup therefore starts at 0: so does ours.
"""
from __future__ import annotations

B, S, L, H, G = ("vit_base_patch16_224", "vit_small_patch16_224", "vit_large_patch16_224", "vit_huge_patch16_224",
                 "vit_giant_patch14_224")

PRETRAIN_COMMON = dict(batch_size=32, num_sample=4, min_lr=1e-5, warmup_lr=0.0, weight_decay=0.05,
                       betas=(0.9, 0.95), eps=1e-8, drop_path=0.0, encoder_ratio=0.9, decoder_ratio=0.5,
                       decoder_depth=4, num_frames=16, sampling_rate=4)
PRETRAIN = {
    B: dict(base_lr=1e-3, epochs=200, warmup_epochs=20, clip_grad=None, grad_checkpointing=False, gpus=32,
            script="vit_b_hybrid_pt.sh"),
    L: dict(base_lr=1e-3, epochs=300, warmup_epochs=30, clip_grad=None, grad_checkpointing=False, gpus=48,
            script="vit_l_hybrid_pt.sh"),
    H: dict(base_lr=1e-3, epochs=300, warmup_epochs=30, clip_grad=None, grad_checkpointing=True, gpus=64,
            script="vit_h_hybrid_pt.sh"),
    G: dict(base_lr=6e-4, epochs=300, warmup_epochs=30, clip_grad=0.02, grad_checkpointing=True, gpus=64,
            script="vit_g_hybrid_pt.sh"),
}
PRETRAIN[S] = dict(PRETRAIN[B], script="none (ViT-B values)")

FINETUNE_COMMON = dict(num_sample=2, warmup_epochs=5, min_lr=1e-6, warmup_lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                       clip_grad=None, grad_checkpointing=False, smoothing=0.1, mixup=0.8, cutmix=1.0,
                       test_num_segment=5, test_num_crop=3, num_frames=16, sampling_rate=4,
                       # run_class_finetuning.py's augmentation defaults (no script sets them):
                       # RandAugment and random erasing, train/augment.py
                       aa="rand-m7-n4-mstd0.5-inc1", train_interpolation="bicubic", reprob=0.25, remode="pixel",
                       recount=1)
FINETUNE = {
    B: dict(batch_size=16, base_lr=7e-4, epochs=90, drop_path=0.1, head_drop=0.0, layer_decay=0.75,
            weight_decay=0.05, gpus=32, script="vit_b_k400_ft.sh"),
    L: dict(batch_size=6, base_lr=2e-3, epochs=35, drop_path=0.2, head_drop=0.0, layer_decay=0.75,
            weight_decay=0.05, gpus=32, script="vit_l_k400_ft.sh"),
    H: dict(batch_size=4, base_lr=1e-3, epochs=40, drop_path=0.2, head_drop=0.5, layer_decay=0.8,
            weight_decay=0.05, gpus=32, script="vit_h_k400_ft.sh"),
    G: dict(batch_size=3, base_lr=1e-3, epochs=30, drop_path=0.2, head_drop=0.0, layer_decay=0.9,
            weight_decay=0.1, gpus=64, script="vit_g_k400_ft.sh"),
}
FINETUNE[S] = dict(FINETUNE[B], script="none (ViT-B values)")

# Not reproduced (README "Training"): the official fp16 (ours: bf16 autocast on CUDA; --precision
# fp16 adds a loss scaler).


def recipe(kind: str, model: str) -> dict:
    """The defaults of ``kind`` ('pretrain' or 'finetune') for ``model``: every option the
    official recipe fixes, plus ``gpus`` and ``script`` (where they come from)."""
    table, common = (PRETRAIN, PRETRAIN_COMMON) if kind == "pretrain" else (FINETUNE, FINETUNE_COMMON)
    if model not in table:
        raise ValueError(f"no official recipe for --model {model!r}; expected one of {sorted(table)}")
    return {**common, **table[model]}


def official(kind: str, key: str) -> str:
    """``--help``'s default note of an option every model shares, read from the recipe (so the
    help and the default cannot drift apart)."""
    return f"(default: official {(PRETRAIN_COMMON if kind == 'pretrain' else FINETUNE_COMMON)[key]})"


def fill_defaults(args, kind: str) -> list[str]:
    """Set every option left at ``None`` to the recipe's value for ``args.model``; returns the
    names filled in."""
    r = recipe(kind, args.model)
    filled = []
    for k, v in r.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
            filled.append(k)
    return filled


def help_table(kind: str) -> str:
    """The per-model defaults, for ``--help``."""
    keys = (("base_lr", "epochs", "warmup_epochs", "clip_grad", "grad_checkpointing") if kind == "pretrain"
            else ("batch_size", "base_lr", "epochs", "drop_path", "head_drop", "layer_decay", "weight_decay"))
    table = PRETRAIN if kind == "pretrain" else FINETUNE
    common = PRETRAIN_COMMON if kind == "pretrain" else FINETUNE_COMMON
    lines = [f"official defaults per --model (scripts/{kind}/*.sh; gpus: the script's GPU count):"]
    for m in (S, B, L, H, G):
        r = table[m]
        lines.append(f"  {m:24s} " + " ".join(f"{k}={r[k]}" for k in keys + ("gpus",)))
    lines.append("  all: " + " ".join(f"{k}={v}" for k, v in common.items()))
    return "\n".join(lines)
