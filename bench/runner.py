"""Build the implementations of one benchmark setup and measure their train steps.

Every implementation of a setup starts from one state dict (drawn once from a seeded model on
the CPU) and sees the same clip and the same masks, so rows differ only in how they compute.
Implementations are built one at a time on the device and freed after, so a row's peak memory
is that implementation's alone.

Each implementation gets the clip as its training loop hands it over: vmae_fast takes the uint8
clip and normalizes it on the device (as ``train/pretrain.py`` feeds it), the official code a
normalized float32 clip. Both come from one uint8 draw, so every row computes on the same values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import vmae_fast
from vmae_fast.config import config_for
from vmae_fast.flops import counted_flops as _counted_flops
from vmae_fast.layers import Blocks
from vmae_fast.memory import checkpoint_block, parse_policy
from vmae_fast.memory_count import measure_train_step
from vmae_fast.reference import ReferencePretrain

from .common.timing import PeakMemory, Stats, free_memory, is_oom, synchronize, time_fn

IMPLS = ("vmae_fast", "vmae_fast-unfused", "reference", "reference+compile", "vmae_fast+compile", "hf")
IMPL_HELP = {
    "vmae_fast": "vmae_fast model, fused ops (VMAE_FAST_KERNELS=1), attention backend 'auto'",
    "vmae_fast-unfused": "vmae_fast model with VMAE_FAST_KERNELS=0 (pure-PyTorch ops), attention 'auto'",
    "reference": "vmae_fast/reference.py: the official computation, naive attention",
    "reference+compile": "the reference under torch.compile",
    "vmae_fast+compile": "vmae_fast (fused ops) under torch.compile",
    "hf": "transformers' VideoMAEForPreTraining (SDPA attention), the same weights through vmae_fast.hf, "
          "the same encoder masks; encoder-only masking only (no dual masking there)",
}


def unsupported(impl: str, decoder_ratio: float) -> str | None:
    """Why ``impl`` cannot run a cell with this decoder ratio, or None."""
    if impl == "hf" and decoder_ratio != 0:
        return "transformers' VideoMAE has no dual masking (its decoder reconstructs every encoder-masked token)"
    return None
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setup:
    """One model size and input shape; every masking x implementation cell runs on it."""

    arch: str
    frames: int = 16
    img_size: int = 224
    batch: int = 32
    ckpt: bool | int | str = False  # the memory policy: False, True, n blocks or "selective"
    depth: int | None = None  # overrides, for tiny smoke configs
    decoder_depth: int = 4
    embed_dim: int | None = None  # width overrides (smoke runs), else the arch's
    decoder_embed_dim: int | None = None

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("depth", "embed_dim", "decoder_embed_dim")
                if getattr(self, k) is not None}

    def config(self):
        return config_for(self.arch, num_frames=self.frames, img_size=self.img_size,
                          decoder_depth=self.decoder_depth, **self.overrides())

    def label(self) -> str:
        s = f"{short_arch(self.arch)} {self.frames}x{self.img_size} b{self.batch}"
        if self.depth is not None:
            s += f" depth{self.depth}"
        if self.embed_dim is not None or self.decoder_embed_dim is not None:
            s += f" width{self.embed_dim or ''}/{self.decoder_embed_dim or ''}"
        if self.ckpt is True:
            return s + " ckpt"
        return s + (f" ckpt={self.ckpt}" if self.ckpt else "")


def short_arch(arch: str) -> str:
    return {"vit_small_patch16_224": "ViT-S", "vit_base_patch16_224": "ViT-B",
            "vit_large_patch16_224": "ViT-L", "vit_huge_patch16_224": "ViT-H",
            "vit_giant_patch14_224": "ViT-g"}.get(arch, arch)


def masking_label(decoder_ratio: float) -> str:
    return "encoder-only" if decoder_ratio == 0 else f"dual {decoder_ratio:g}"


class _Checkpointed(nn.Module):
    """A reference block run under non-reentrant activation checkpointing (the official code
    wraps its blocks the same way when ``use_checkpoint`` is set), fully or selectively."""

    def __init__(self, block: nn.Module, mode: str = "full"):
        super().__init__()
        self.block = block
        self.enabled = True
        self.mode = mode

    def forward(self, x):
        if self.enabled and torch.is_grad_enabled():
            return checkpoint_block(self.block, x, self.mode)
        return self.block(x)


def split_policy(policy) -> tuple:
    """``(encoder policy, decoder policy)`` of a ``Setup.ckpt``: one policy for both, or a string
    ``"<encoder>/<decoder>"`` of ``none``, ``full``, ``selective`` or block counts."""
    if isinstance(policy, str) and "/" in policy:
        names = {"none": False, "full": True}
        parts = [p.strip() for p in policy.split("/")]
        if len(parts) != 2:
            raise ValueError(f"a per-stack policy is '<encoder>/<decoder>', got {policy!r}")
        return tuple(int(p) if p.isdigit() else names.get(p, p) for p in parts)
    return policy, policy


def checkpoint_reference(ref: ReferencePretrain, policy: bool | int | str = True) -> ReferencePretrain:
    """Wrap the reference's blocks for ``policy`` (as ``set_grad_checkpointing`` takes it, or
    ``"<encoder>/<decoder>"``)."""
    for blocks, pol in zip((ref.encoder.blocks, ref.decoder.blocks), split_policy(policy)):
        n, mode = parse_policy(pol, len(blocks))
        for i in range(n):
            blocks[i] = _Checkpointed(blocks[i], mode)
    return ref


@contextlib.contextmanager
def checkpointing_disabled(module: nn.Module):
    """Run ``module`` without activation checkpointing (vmae_fast's ``Blocks`` and the
    reference's ``_Checkpointed`` wrappers), restoring the setting after."""
    saved = []
    for m in module.modules():
        if isinstance(m, Blocks):
            saved.append((m, "checkpointed", m.checkpointed))
            m.checkpointed = 0
        elif isinstance(m, _Checkpointed):
            saved.append((m, "enabled", m.enabled))
            m.enabled = False
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def master_state(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = vmae_fast.create_pretrain_model(setup.arch, num_frames=setup.frames, img_size=setup.img_size,
                                            decoder_depth=setup.decoder_depth, **setup.overrides())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def param_count(setup: Setup) -> int:
    with torch.device("meta"):
        model = vmae_fast.create_pretrain_model(setup.arch, num_frames=setup.frames, img_size=setup.img_size,
                                                decoder_depth=setup.decoder_depth, **setup.overrides())
    return sum(p.numel() for p in model.parameters())


def build(impl: str, setup: Setup, state: dict, device: torch.device) -> nn.Module:
    """The module of ``impl`` on ``device`` with the master weights, in train mode."""
    backend = "auto"
    model = vmae_fast.create_pretrain_model(setup.arch, num_frames=setup.frames, img_size=setup.img_size,
                                            decoder_depth=setup.decoder_depth, attn_backend=backend,
                                            **setup.overrides())
    model.load_state_dict(state, strict=True)
    model.to(device).train()
    if impl == "hf":
        module = vmae_fast.hf.to_hf_model(model, attn_implementation="sdpa")
        if setup.ckpt:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return module
    if impl.startswith("reference"):
        ref = ReferencePretrain.from_model(model)
        del model
        if setup.ckpt:
            checkpoint_reference(ref, setup.ckpt)
        return torch.compile(ref) if impl.endswith("+compile") else ref
    if setup.ckpt:
        enc, dec = split_policy(setup.ckpt)
        model.set_grad_checkpointing(enc, decoder=dec)
    return torch.compile(model) if impl.endswith("+compile") else model


def loss_fn(impl: str, module: nn.Module, video: torch.Tensor, masks, decoder_ratio: float) -> Callable:
    if impl == "hf":
        why = unsupported(impl, decoder_ratio)
        if why:
            raise ValueError(why)
        return lambda: vmae_fast.hf.hf_pretrain_step(module, video, masks, check_masks=False)
    if impl.startswith("reference"):
        dec = None if decoder_ratio == 0 else masks.decoder_masked
        return lambda: module(video, masks.encoder_masked, dec)[0]
    return lambda: module(video, masks).loss


def make_step(impl: str, module: nn.Module, video, masks, decoder_ratio: float, device: torch.device,
              dtype: torch.dtype, optimizer: torch.optim.Optimizer | None) -> Callable[[], torch.Tensor]:
    """One train step: zero grads, forward under autocast (unless fp32), backward, optimizer step."""
    fwd = loss_fn(impl, module, video, masks, decoder_ratio)
    autocast = dtype != torch.float32

    def step():
        module.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = fwd()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss

    return step


def make_optimizer(module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # lr 0: the step costs what a real AdamW step costs, but weights stay the master weights,
    # so every repeat computes on the same values as every other implementation.
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(module.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.05, **kw)


def counted_flops(step_fwd_bwd: Callable[[], None]) -> tuple[int | None, list[str] | str]:
    """``(FLOPs, missed ops)`` of one forward + backward as ``torch.utils.flop_counter`` counts
    them, attention by the analytic rule on every torch build and filled in where the counter
    misses it (``vmae_fast.flops.counted_flops``); ``(None, why)`` where the counter cannot run
    the step."""
    try:
        return _counted_flops(step_fwd_bwd)
    except Exception as exc:  # compiled graphs and exotic kernels the counter cannot trace
        return None, f"{type(exc).__name__}: {exc}"[:200]


def try_batch(run_once: Callable[[int], None], batch: int, free: Callable[[], None]) -> str | None:
    """Run one step of ``batch``; ``None`` if it fit, else the out-of-memory message. Other
    errors propagate.

    Memory is freed after the ``except`` block has ended: until then the exception's traceback
    holds the failed step's frames and through them its activations, which neither
    ``gc.collect`` nor ``torch.cuda.empty_cache`` could release."""
    error = None
    try:
        run_once(batch)
    except Exception as exc:
        if not is_oom(exc):
            raise
        error = f"{type(exc).__name__}: {exc}"[:300]
    if error is not None:
        free()
    return error


def max_batch(run_once: Callable[[int], None], start: int, device: torch.device, cap: int = 4096,
              free: Callable[[], None] | None = None) -> dict:
    """Largest batch whose train step fits: double from ``start`` until out of memory, then
    bisect, up to ``cap``. Each try runs one step; an out-of-memory error (``is_oom``) is
    recorded in ``tries`` and memory freed (``free``, default ``free_memory(device)``) before the
    next try."""
    if cap < 1:
        raise ValueError(f"max-batch cap must be >= 1, got {cap}")
    free = free or (lambda: free_memory(device))
    lo, hi = 0, None
    b = min(max(1, start), cap)
    tries = []

    def attempt(batch):
        err = try_batch(run_once, batch, free)
        tries.append({"batch": batch, "fits": err is None, **({"error": err} if err else {})})
        return err is None

    while b <= cap:
        if not attempt(b):
            hi = b
            break
        lo = b
        if b == cap:
            break
        b = min(2 * b, cap)
    if hi is None:
        return {"max_batch": lo, "capped": True, "cap": cap, "tries": tries}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    return {"max_batch": lo, "capped": False, "cap": cap, "tries": tries}


def clip_dtype(impl: str) -> torch.dtype:
    """The clip dtype ``impl``'s training loop feeds: uint8 for vmae_fast (normalized on the
    device, 4x less input memory than float32), normalized float32 for the official code."""
    return torch.float32 if impl.startswith("reference") or impl == "hf" else torch.uint8


def make_inputs(setup: Setup, batch: int, decoder_ratio: float, encoder_ratio: float, device, seed: int,
                dtype: torch.dtype = torch.float32):
    """A random clip and masks drawn on the CPU from ``seed``, so every implementation and
    device sees the same values: uint8 pixels (never all zeros) as they are, or for
    ``dtype=float32`` ImageNet-normalized as the official data pipeline does."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch, 3, setup.frames, setup.img_size, setup.img_size), generator=g,
                          dtype=torch.uint8)
    cfg = setup.config()
    masks = vmae_fast.DualMask.sample(batch, cfg.grid, encoder_ratio, decoder_ratio, generator=g)
    if dtype != torch.uint8:
        video = vmae_fast.ops.normalize_uint8(video).to(dtype)
    return video.to(device), masks.to(device)


@dataclass
class CellOptions:
    device: torch.device
    dtype: torch.dtype
    warmup: int = 2
    repeats: int = 10
    encoder_ratio: float = 0.9
    optimizer: bool = True
    max_batch: bool = False
    max_batch_cap: int | None = 4096  # None on CPU: no search (an OOM there kills the process)
    count_flops: bool = True
    seed: int = 0


def kernels_of(impl: str):
    """The fused-op switch ``impl`` runs under: ``vmae_fast-unfused`` is the model on the ops'
    references (``use_kernels(False)``), every other implementation the kernels."""
    return vmae_fast.ops.use_kernels(impl != "vmae_fast-unfused")


def _with_kernels(impl: str, fn: Callable) -> Callable:
    def f():
        with kernels_of(impl):
            return fn()
    return f


def count_train_step(impl: str, module: nn.Module, video, masks, decoder_ratio: float, optimizer,
                     dtype: torch.dtype, **kw):
    """``vmae_fast.memory_count.measure_train_step`` of one train step of ``impl`` (under its kernel
    switch); ``kw`` goes to ``measure_train_step``."""
    mask_tensors = [getattr(masks, f) for f in ("encoder_masked", "decoder_masked", "visible_idx", "decoder_idx")]
    fwd = loss_fn(impl, module, video, masks, decoder_ratio)
    with kernels_of(impl):
        return measure_train_step(module, fwd, optimizer, inputs=[video, *mask_tensors], autocast_dtype=dtype, **kw)


def _count(impl, module, setup, decoder_ratio, opt, row, video, masks) -> None:
    """FLOPs of one train step of ``impl``, two ways.

    ``counted_flops_train_step``: what the step as run computes (hardware FLOPs: with activation
    checkpointing, the blocks' forward runs again in backward). ``counted_flops_model_step``:
    the same step without that recomputation (model FLOPs: forward + backward, ~3x forward;
    exactly 3x less the input gradient of the patch embedding, which no one needs). The latter
    is counted on one clip with checkpointing switched off (per-clip work is the same at any
    batch; one clip keeps an un-checkpointed ViT-g step small) and scaled to the batch."""
    device, dtype = opt.device, opt.dtype
    if not opt.count_flops or "compile" in impl:
        row["counted_flops_train_step"] = row["counted_flops_model_step"] = None
        return
    nograd = make_step(impl, module, video, masks, decoder_ratio, device, dtype, None)
    hw, missed = counted_flops(_with_kernels(impl, nograd))
    model, missed_model = hw, missed
    if hw is not None and setup.ckpt:
        v1, m1 = make_inputs(setup, 1, decoder_ratio, opt.encoder_ratio, device, opt.seed, clip_dtype(impl))
        one = make_step(impl, module, v1, m1, decoder_ratio, device, dtype, None)
        with checkpointing_disabled(module):
            model, missed_model = counted_flops(_with_kernels(impl, one))
        model = None if model is None else model * setup.batch
    module.zero_grad(set_to_none=True)
    row["counted_flops_train_step"] = hw
    row["counted_flops_model_step"] = model
    # FLOPs of checkpointing's recomputation, and their share of the step as run
    row["recompute_flops"] = hw - model if (hw is not None and model is not None) else None
    row["recompute_share"] = (hw - model) / hw if (hw and model is not None) else None
    errors = [m for m in (missed, missed_model) if isinstance(m, str)]
    if errors:
        row["flop_counter_error"] = errors[0]
    # attention kernels torch's counter counted as 0 FLOPs here, filled in from their shapes
    row["flop_counter_missed"] = sorted({op for m in (missed, missed_model) if isinstance(m, list) for op in m})


def _search_max_batch(impl, module, setup, decoder_ratio, opt, optimizer) -> dict:
    device = opt.device
    if opt.max_batch_cap is None:
        return {"max_batch": None, "why": "CPU: an out-of-memory there kills the process; pass "
                                          "--max-batch-cap to search up to a bound"}
    cdt = clip_dtype(impl)  # the timed step's clip dtype: a uint8 clip is 4x smaller than float32

    def run_once(b):
        v, m = make_inputs(setup, b, decoder_ratio, opt.encoder_ratio, device, opt.seed, cdt)
        _with_kernels(impl, make_step(impl, module, v, m, decoder_ratio, device, opt.dtype, optimizer))()
        synchronize(device)

    def free():
        module.zero_grad(set_to_none=True)  # a step that failed in backward leaves some grads
        free_memory(device)

    if device.type == "cuda":  # start from an empty cache (a CPU has none: gc.collect would be time for nothing)
        free()
    out = max_batch(run_once, setup.batch, device, opt.max_batch_cap, free)
    out["clip_dtype"] = str(cdt).replace("torch.", "")
    return out


def _memory_flops_maxbatch(impl, module, setup, decoder_ratio, opt, optimizer, step, video, masks) -> dict:
    device = opt.device
    row: dict = {"clip_dtype": str(video.dtype).replace("torch.", "")}
    with PeakMemory(device) as mem:
        step()
    row["memory_kind"] = mem.kind
    row["peak_mem_bytes"] = mem.peak
    row["base_mem_bytes"] = mem.base
    row["act_mem_per_clip_bytes"] = None if mem.delta is None else mem.delta / setup.batch
    row.update(exact_memory(impl, module, setup, decoder_ratio, opt, optimizer, video, masks))
    # what the step holds from forward to backward, per clip: exact, checkpointed blocks included
    row["saved_act_per_clip_bytes"] = row.get("exact_held_per_clip_bytes")
    _count(impl, module, setup, decoder_ratio, opt, row, video, masks)
    if opt.max_batch:
        row["max_batch"] = _search_max_batch(impl, module, setup, decoder_ratio, opt, optimizer)
    return row


def exact_memory(impl, module, setup, decoder_ratio, opt, optimizer, video, masks) -> dict:
    """The exact bytes of one more train step of the cell (``vmae_fast.memory_count.measure_train_step``:
    live tensor storages op by op, checkpointing's recomputation included, the same count on
    every device; on CUDA ``torch.cuda.max_memory_allocated`` of the same step beside it). The
    step is the timed one (same optimizer, autocast dtype and clip), after it has run, so
    gradients and optimizer state are those of a running loop."""
    if "compile" in impl:
        return {"exact_memory": None, "exact_memory_why": "not counted under torch.compile"}
    m = count_train_step(impl, module, video, masks, decoder_ratio, optimizer, opt.dtype, warmup_steps=0)
    b = setup.batch
    row = {"exact_memory": m.to_dict(), "exact_peak_bytes": m.peak_total,
           "exact_act_peak_per_clip_bytes": m.peak_activations / b,
           "exact_held_per_clip_bytes": m.held_after_forward / b}
    if m.cuda_max_allocated is not None:  # the allocator's view of the same step, beside the count
        row["cuda_max_allocated_bytes"] = m.cuda_max_allocated
        row["exact_over_cuda_allocated"] = m.peak_total / m.cuda_max_allocated
    return row


def measure_cell(impl: str, module: nn.Module, setup: Setup, decoder_ratio: float,
                 opt: CellOptions, optimizer) -> dict:
    """Time, memory, FLOPs (and optionally the largest batch) of one train-step cell."""
    device = opt.device
    video, masks = make_inputs(setup, setup.batch, decoder_ratio, opt.encoder_ratio, device, opt.seed,
                               clip_dtype(impl))
    step = _with_kernels(impl, make_step(impl, module, video, masks, decoder_ratio, device, opt.dtype, optimizer))
    row: dict = {"loss": float(step().detach().float())}  # lr is 0: every step's loss equals this one
    stats = time_fn(step, device, warmup=max(0, opt.warmup - 1), repeats=opt.repeats)
    row.update(_memory_flops_maxbatch(impl, module, setup, decoder_ratio, opt, optimizer, step, video, masks))
    row["step_s"] = stats.to_dict()
    row["clips_per_s"] = setup.batch / stats.median
    row["timing"] = "sequential"
    return row


def measure_cells_interleaved(modules: dict[str, tuple[nn.Module, object]], setup: Setup,
                              decoder_ratio: float, opt: CellOptions) -> dict[str, dict]:
    """All implementations of one cell, timed round-robin (one step of each per round) so that
    load from other processes on a shared CPU falls on every implementation alike."""
    device = opt.device
    inputs = {dt: make_inputs(setup, setup.batch, decoder_ratio, opt.encoder_ratio, device, opt.seed, dt)
              for dt in {clip_dtype(impl) for impl in modules}}
    steps, rows, samples = {}, {}, {}
    for impl, (module, optimizer) in modules.items():
        video, masks = inputs[clip_dtype(impl)]
        steps[impl] = _with_kernels(impl, make_step(impl, module, video, masks, decoder_ratio, device,
                                                    opt.dtype, optimizer))
        rows[impl] = {"loss": float(steps[impl]().detach().float())}
        samples[impl] = []
    for _ in range(max(0, opt.warmup - 1)):
        for f in steps.values():
            f()
    for _ in range(opt.repeats):
        for impl, f in steps.items():
            samples[impl].append(time_fn(f, device, warmup=0, repeats=1).samples[0])
    for impl, (module, optimizer) in modules.items():
        stats = Stats.of(samples[impl])
        rows[impl].update(_memory_flops_maxbatch(impl, module, setup, decoder_ratio, opt, optimizer,
                                                 steps[impl], *inputs[clip_dtype(impl)]))
        rows[impl]["step_s"] = stats.to_dict()
        rows[impl]["clips_per_s"] = setup.batch / stats.median
        rows[impl]["timing"] = "interleaved"
    return rows
