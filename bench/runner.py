"""Build the implementations of one benchmark setup and measure their train steps.

Every implementation of a setup starts from one state dict (drawn once from a seeded model on
the CPU) and sees the same clip and the same masks, so rows differ only in how they compute.
Implementations are built one at a time on the device and freed after, so a row's peak memory
is that implementation's alone.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import vmae_fast
from vmae_fast.config import config_for
from vmae_fast.reference import ReferencePretrain

from .timing import PeakMemory, SavedActivations, Stats, free_memory, is_oom, time_fn

IMPLS = ("vmae_fast", "vmae_fast-unfused", "reference", "reference+compile", "vmae_fast+compile")
IMPL_HELP = {
    "vmae_fast": "vmae_fast model, fused ops (VMAE_FAST_KERNELS=1), attention backend 'auto'",
    "vmae_fast-unfused": "vmae_fast model with VMAE_FAST_KERNELS=0 (pure-PyTorch ops), attention 'auto'",
    "reference": "vmae_fast/reference.py: the official computation, naive attention",
    "reference+compile": "the reference under torch.compile",
    "vmae_fast+compile": "vmae_fast (fused ops) under torch.compile",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setup:
    """One model size and input shape; every masking x implementation cell runs on it."""

    arch: str
    frames: int = 16
    img_size: int = 224
    batch: int = 32
    ckpt: bool = False
    depth: int | None = None  # overrides, for tiny smoke configs
    decoder_depth: int = 4

    def overrides(self) -> dict:
        return {} if self.depth is None else {"depth": self.depth}

    def config(self):
        return config_for(self.arch, num_frames=self.frames, img_size=self.img_size,
                          decoder_depth=self.decoder_depth, **self.overrides())

    def label(self) -> str:
        s = f"{short_arch(self.arch)} {self.frames}x{self.img_size} b{self.batch}"
        if self.depth is not None:
            s += f" depth{self.depth}"
        return s + (" ckpt" if self.ckpt else "")


def short_arch(arch: str) -> str:
    return {"vit_small_patch16_224": "ViT-S", "vit_base_patch16_224": "ViT-B",
            "vit_large_patch16_224": "ViT-L", "vit_huge_patch16_224": "ViT-H",
            "vit_giant_patch14_224": "ViT-g"}.get(arch, arch)


def masking_label(decoder_ratio: float) -> str:
    return "encoder-only" if decoder_ratio == 0 else f"dual {decoder_ratio:g}"


@contextlib.contextmanager
def kernels_env(enabled: bool):
    """Set ``VMAE_FAST_KERNELS`` for the ops' dispatch (read at call time) and restore it."""
    old = os.environ.get("VMAE_FAST_KERNELS")
    os.environ["VMAE_FAST_KERNELS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VMAE_FAST_KERNELS", None)
        else:
            os.environ["VMAE_FAST_KERNELS"] = old


class _Checkpointed(nn.Module):
    """A reference block run under non-reentrant activation checkpointing (the official code
    wraps its blocks the same way when ``use_checkpoint`` is set)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False) if torch.is_grad_enabled() else self.block(x)


def checkpoint_reference(ref: ReferencePretrain) -> ReferencePretrain:
    for blocks in (ref.encoder.blocks, ref.decoder.blocks):
        for i in range(len(blocks)):
            blocks[i] = _Checkpointed(blocks[i])
    return ref


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
    if impl.startswith("reference"):
        ref = ReferencePretrain.from_model(model)
        del model
        if setup.ckpt:
            checkpoint_reference(ref)
        return torch.compile(ref) if impl.endswith("+compile") else ref
    if setup.ckpt:
        model.set_grad_checkpointing(True)
    return torch.compile(model) if impl.endswith("+compile") else model


def loss_fn(impl: str, module: nn.Module, video: torch.Tensor, masks, decoder_ratio: float) -> Callable:
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


def counted_flops(step_fwd_bwd: Callable[[], None]) -> int | None:
    """FLOPs ``torch.utils.flop_counter`` counts for one forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            step_fwd_bwd()
        return int(fc.get_total_flops())
    except Exception:  # compiled graphs and exotic kernels the counter cannot trace
        return None


def try_batch(run_once: Callable[[int], None], batch: int, device: torch.device) -> bool:
    try:
        run_once(batch)
        return True
    except Exception as exc:
        if not is_oom(exc):
            raise
        free_memory(device)
        return False


def max_batch(run_once: Callable[[int], None], start: int, device: torch.device, cap: int = 4096) -> dict:
    """Largest batch whose train step fits: double from ``start`` until out of memory, then
    bisect. Each try runs one step; an OOM is caught and the cache emptied."""
    lo, hi = 0, None
    b = max(1, start)
    tries = []
    while b <= cap:
        ok = try_batch(run_once, b, device)
        tries.append((b, ok))
        if not ok:
            hi = b
            break
        lo = b
        b *= 2
    if hi is None:
        return {"max_batch": lo, "capped": True, "cap": cap, "tries": tries}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = try_batch(run_once, mid, device)
        tries.append((mid, ok))
        lo, hi = (mid, hi) if ok else (lo, mid)
    return {"max_batch": lo, "capped": False, "cap": cap, "tries": tries}


def make_inputs(setup: Setup, batch: int, decoder_ratio: float, encoder_ratio: float, device, seed: int):
    """A random normalized clip (never zeros) and masks, drawn on the CPU from ``seed`` so every
    implementation and device sees the same values."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 3, setup.frames, setup.img_size, setup.img_size, generator=g)
    cfg = setup.config()
    masks = vmae_fast.DualMask.sample(batch, cfg.grid, encoder_ratio, decoder_ratio, generator=g)
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
    max_batch_cap: int = 4096
    count_flops: bool = True
    seed: int = 0


def _with_kernels(impl: str, fn: Callable) -> Callable:
    enabled = impl != "vmae_fast-unfused"

    def f():
        with kernels_env(enabled):
            return fn()
    return f


def _memory_flops_maxbatch(impl, module, setup, decoder_ratio, opt, optimizer, step, video, masks) -> dict:
    device, dtype = opt.device, opt.dtype
    row: dict = {}
    with PeakMemory(device) as mem:
        step()
    row["memory_kind"] = mem.kind
    row["peak_mem_bytes"] = mem.peak
    row["base_mem_bytes"] = mem.base
    row["act_mem_per_clip_bytes"] = None if mem.delta is None else mem.delta / setup.batch
    mask_tensors = [getattr(masks, f) for f in ("encoder_masked", "decoder_masked", "visible_idx", "decoder_idx")]
    with SavedActivations(exclude=[*module.parameters(), video, *mask_tensors]) as saved:
        step()
    row["saved_act_per_clip_bytes"] = saved.bytes / setup.batch
    if opt.count_flops and "compile" not in impl:
        nograd = make_step(impl, module, video, masks, decoder_ratio, device, dtype, None)
        row["counted_flops_train_step"] = counted_flops(_with_kernels(impl, nograd))
        module.zero_grad(set_to_none=True)
    else:
        row["counted_flops_train_step"] = None
    if opt.max_batch:
        if device.type != "cuda":
            row["max_batch"] = {"max_batch": None, "why": "CPU: no OOM recovery (the OS kills the process)"}
        else:
            def run_once(b):
                v, m = make_inputs(setup, b, decoder_ratio, opt.encoder_ratio, device, opt.seed)
                _with_kernels(impl, make_step(impl, module, v, m, decoder_ratio, device, dtype, optimizer))()
                torch.cuda.synchronize(device)
            free_memory(device)
            row["max_batch"] = max_batch(run_once, setup.batch, device, opt.max_batch_cap)
    return row


def measure_cell(impl: str, module: nn.Module, setup: Setup, decoder_ratio: float,
                 opt: CellOptions, optimizer) -> dict:
    """Time, memory, FLOPs (and optionally the largest batch) of one train-step cell."""
    device = opt.device
    video, masks = make_inputs(setup, setup.batch, decoder_ratio, opt.encoder_ratio, device, opt.seed)
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
    video, masks = make_inputs(setup, setup.batch, decoder_ratio, opt.encoder_ratio, device, opt.seed)
    steps, rows, samples = {}, {}, {}
    for impl, (module, optimizer) in modules.items():
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
                                                 steps[impl], video, masks))
        rows[impl]["step_s"] = stats.to_dict()
        rows[impl]["clips_per_s"] = setup.batch / stats.median
        rows[impl]["timing"] = "interleaved"
    return rows
