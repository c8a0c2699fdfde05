"""Processes and devices: torchrun's environment, the device of each rank, DDP / FSDP2 wrapping,
and the few collectives the loop needs."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from vmae_fast import envs
from vmae_fast.device import select_device
from vmae_fast.layers import Block


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` as torchrun sets them (a single process without it)."""
    return envs.RANK, envs.WORLD_SIZE, envs.LOCAL_RANK


def setup(args) -> Dist:
    """Device and process group from torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)."""
    rank, world, local = world_from_env()
    device = select_device(args.device, local, world)  # a CUDA device also becomes the current one
    if world > 1 and not dist.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        # Each torchrun restart of the group keys its store entries apart: the agent's store
        # outlives a restart, and a restarted rank that read the address a dead one had left
        # there failed gloo's connect ("Connection refused"; 2 runs in 3 of the restart test).
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"vmae_fast/restart{envs.TORCHELASTIC_RESTART_COUNT}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Dist(rank, world, local, device, fsdp=world > 1 and args.dist == "fsdp")


def teardown(d: Dist, wait: bool = True) -> None:
    if d.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """The global streams: python, numpy (timm's mixup draws from it), torch CPU and CUDA."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _cpu_stream_stubs() -> None:
    """FSDP2 drives the device's streams and events; on the CPU those are no-op stubs, and the
    stub ``torch.cpu.Stream`` of older torch (2.6) lacks ``record_event``/``wait_event``. Adds
    them where missing, as no-ops like newer torch's own (the CPU runs everything in order)."""
    stream = torch.cpu.Stream
    if not hasattr(stream, "record_event"):
        stream.record_event = lambda self, event=None: None
    if not hasattr(stream, "wait_event"):
        stream.wait_event = lambda self, event: None


def wrap(model: nn.Module, d: Dist, *, bf16: bool, compile: bool) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) under torchrun; compile last."""
    if d.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cpu = d.device.type == "cpu"
        if cpu:
            _cpu_stream_stubs()
        mesh = init_device_mesh(d.device.type, (d.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        # On the CPU the blocks keep their gathered parameters from forward to backward (no second
        # all-gather before backward): there, FSDP2's all-gather copy-out bumps the parameters'
        # autograd version counters, which older torch (2.6) does not undo (pytorch/pytorch#132014),
        # and backward would then refuse the tensors forward saved. CUDA reshards after forward.
        for m in model.modules():
            if isinstance(m, Block):
                fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=not cpu)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not cpu)
    elif d.enabled:
        ids = [d.device.index] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile:
        model.compile()  # in place: state-dict keys keep their names (no "_orig_mod.")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x




def all_true(flag: bool, d: Dist) -> bool:
    """``flag`` on every rank (FSDP: each rank checks only its shards)."""
    if not d.enabled:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=d.device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
