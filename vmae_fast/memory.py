"""Activation memory policies: how the transformer blocks trade memory for recomputation. The
exact count of the bytes a train step keeps alive, which measures them, is ``memory_count.py``.

Policies (``Blocks.set_grad_checkpointing`` and the models' ``set_grad_checkpointing``):

- ``False`` / ``"none"``: autograd saves what each op needs, without second copies of what
  autocast casts (``SavedCasts``): the bf16/fp16 copy of a weight is kept as the fp32 parameter
  and cast again in backward, the float32 copy of a bf16 activation (CUDA autocast's LayerNorm
  input) as the bf16 tensor, and the blocks run without autocast's weight-cast cache, so no copy
  of all the weights is alive at the end of forward. Casts are exact: same values, bit for bit.
- ``True`` / ``"full"``: every block under non-reentrant checkpointing; only its input is kept and
  the whole block runs again in backward.
- ``n`` (int): the first ``n`` blocks as ``True``, the others as ``False``.
- ``"selective"``: every block under non-reentrant checkpointing with a selective policy
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs of the matmuls
  that are expensive to recompute (``qkv`` and ``fc1``) and of attention over many tokens are
  kept; LayerNorm, GELU, bias and residual adds, drop path, the cheap ``proj`` matmul (1/12 of a
  block's matmul work) and attention over few tokens (the encoder's visible ones, a few percent
  of the block: ``ATTENTION_RECOMPUTE_MAX``) run again in backward, ``fc2`` not at all
  (backward needs its input, not its output; its output is kept when drop path or dropout
  follows it). Random ops run again from the forward's RNG state, so they draw what they drew
  (attention with dropout runs again too).

Every policy computes the same loss and the same gradients as ``False`` (bit-identical on CPU).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------ policies
POLICY_NAMES = ("none", "full", "selective")


def parse_policy(enable, depth: int) -> tuple[int, str]:
    """``(blocks checkpointed, mode)`` of a ``set_grad_checkpointing`` argument for a stack of
    ``depth`` blocks; ``mode`` is ``"none"``, ``"full"`` or ``"selective"``."""
    if isinstance(enable, bool):
        return (depth, "full") if enable else (0, "none")
    if isinstance(enable, int) and enable >= 0:
        n = min(enable, depth)
        return (n, "full") if n else (0, "none")
    if isinstance(enable, str) and enable in POLICY_NAMES:
        return {"none": (0, "none"), "full": (depth, "full"), "selective": (depth, "selective")}[enable]
    raise ValueError(f"grad checkpointing takes False, True, a block count >= 0 or one of "
                     f"{POLICY_NAMES}, got {enable!r}")


def policy_label(n: int, mode: str, depth: int) -> bool | int | str:
    """The ``set_grad_checkpointing`` argument that gives ``(n, mode)``."""
    if mode == "selective":
        return "selective"
    if n == 0:
        return False
    return True if n >= depth else n


def _op_names(*names: str) -> frozenset:
    out = set()
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None and hasattr(packet, overload):
            out.add(getattr(packet, overload))
    return frozenset(out)


# The attention kernels SDPA dispatches to (CPU and CUDA; the names of torch 2.6 to 2.14).
_ATTENTION_OPS = _op_names(
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "aten._flash_attention_forward.default",
    "aten._efficient_attention_forward.default",
)
_MATMUL_OPS = _op_names("aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten.baddbmm.default")


def _is_attention(func) -> bool:
    if func in _ATTENTION_OPS:
        return True
    name = str(func)  # flash_attn / xformers custom ops (forward only)
    return ("flash" in name or "attention" in name or "attn" in name) and "backward" not in name \
        and "bwd" not in name


def _widens(func, args) -> bool:
    """Whether a 2-d matmul maps to more features than it reads (``qkv``: D -> 3D, ``fc1``:
    D -> 4D), from its operand shapes: ``addmm(bias, x, w_t)`` / ``mm(x, w_t)``."""
    mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
    if len(mats) < 2:
        return True
    x, w = mats[-2], mats[-1]
    return w.shape[1] > x.shape[1]


def _selective_policy(keep_tail: bool, ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    # Random ops run again: the recomputation starts from the forward's RNG state
    # (``preserve_rng_state``), and as long as every op that draws runs again, in order, each
    # draws what it drew in the forward. (A kept random op would draw nothing in the
    # recomputation and shift every later draw; an in-place one, ``bernoulli_``, cannot be kept.)
    if _is_attention(func):  # (tagged as a random op: it draws only with dropout)
        # Attention with dropout draws: it runs again as well (only with ``attn_drop > 0``). Else
        # it is kept, unless it is cheap: over few tokens (the encoder's visible ones) it costs a
        # few percent of the block and keeping it would cost D bytes per token.
        if _dropout_p(func, args, kwargs) or _attention_cost(func, args) <= ATTENTION_RECOMPUTE_MAX:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if func in _MATMUL_OPS:
        if func in _BATCHED_MATMUL_OPS:  # the ``math`` attention backend's two matmuls
            return CheckpointPolicy.MUST_SAVE
        # qkv (D -> 3D) and fc1 (D -> 4D) widen the features: kept. proj (D -> D, 1/12 of a
        # block's matmul work) is recomputed. fc2 (4D -> D): backward needs its input, not its
        # output, so the recomputation stops before it, unless a random op follows it (drop path,
        # dropout), whose saved mask is only reached past fc2: then fc2's output is kept.
        if _widens(func, args):
            return CheckpointPolicy.MUST_SAVE
        if keep_tail and _narrows(func, args):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


# "selective" recomputes attention when its forward FLOPs are at most this share of its block's
# matmul FLOPs (``_attention_cost``): the encoder's few visible tokens (ViT-B 16x224 at 0.9
# masking: 3%), not the decoder's (ViT-B: 41%) nor a classifier's full clip.
ATTENTION_RECOMPUTE_MAX = 0.1


def _attention_cost(func, args) -> float:
    """Attention's forward FLOPs over the block's matmul FLOPs, estimated from q's shape: per token
    ``2 N D`` multiply-adds against ``12 D^2`` (qkv, proj, and an MLP of ratio 4), i.e.
    ``N / (6 D)``. ``inf`` where the shape is unknown."""
    q = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if q is None or q.dim() != 4:
        return float("inf")
    if func in _ATTENTION_OPS and "_flash_attention_forward" not in str(func) \
            and "_efficient_attention_forward" not in str(func):
        n, dim = q.shape[2], q.shape[1] * q.shape[3]  # (B, H, N, d)
    else:
        n, dim = q.shape[1], q.shape[2] * q.shape[3]  # (B, N, H, d)
    return n / (6 * dim)


def _dropout_p(func, args, kwargs) -> float:
    """The dropout probability an attention op was called with (0 if it takes none)."""
    try:
        schema = func._schema.arguments
    except AttributeError:
        return 0.0
    for i, a in enumerate(schema):
        if a.name in ("dropout_p", "dropout", "p"):
            v = kwargs.get(a.name, args[i] if i < len(args) and not a.kwarg_only else 0.0)
            return float(v or 0.0) if isinstance(v, (int, float)) else 0.0
    return 0.0


def _narrows(func, args) -> bool:
    mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
    return len(mats) >= 2 and mats[-1].shape[1] < mats[-2].shape[1]


_BATCHED_MATMUL_OPS = _op_names("aten.bmm.default", "aten.baddbmm.default")


def selective_context(keep_tail: bool = False):
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for the ``"selective"`` policy;
    ``keep_tail``: keep the output of the block's last (narrowing) matmul too."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(functools.partial(_selective_policy, keep_tail))


def _draws_after_last_matmul(block) -> bool:
    """Whether ``block`` (a ``layers.Block`` in training) has a random op after ``fc2``."""
    if not getattr(block, "training", False):
        return False
    dp = getattr(getattr(block, "drop_path", None), "p", 0.0) or 0.0
    drop = getattr(getattr(block, "mlp", None), "drop", 0.0) or 0.0
    return dp > 0 or drop > 0


def checkpoint_block(block: Callable, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``block(x)`` under non-reentrant checkpointing (``mode`` ``"full"`` or ``"selective"``); RNG
    state is restored for the recomputation (``preserve_rng_state``, the default)."""
    if mode == "selective":
        ctx = functools.partial(selective_context, _draws_after_last_matmul(block))
        return checkpoint(block, x, use_reentrant=False, context_fn=ctx)
    return checkpoint(block, x, use_reentrant=False)


# ------------------------------------------------------------- no second copies of saved tensors
_LOW = (torch.bfloat16, torch.float16)


class _Recast:
    """A saved tensor kept as what it was cast from: ``src.to(dtype)`` viewed as it was saved.
    ``src``'s version is kept too: a source changed in place before backward (a parameter edited
    between forward and backward) raises, as autograd raises for a saved tensor changed so."""

    __slots__ = ("src", "dtype", "size", "stride", "offset", "version")

    def __init__(self, src, dtype, t):
        self.src, self.dtype, self.version = src, dtype, src._version
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def get(self) -> torch.Tensor:
        if self.src._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a {tuple(self.src.shape)} tensor whose {self.dtype} cast was saved for backward "
                f"(vmae_fast.memory.SavedCasts) is at version {self.src._version}, expected {self.version}")
        # recorded by autograd only where backward itself is (create_graph=True): then the
        # unpacked tensor is tied to its source, as the saved one was
        return self.src.to(self.dtype).as_strided(self.size, self.stride, self.offset)


class SavedCasts:
    """``saved_tensors_hooks`` that keep no second copy of what autocast casts (policy ``none``):

    - the bf16/fp16 copy of a weight (autocast casts each parameter once per forward, and every
      matmul saves the copy for its input gradient): kept as the parameter itself, cast again in
      backward;
    - a float32 copy of a bf16/fp16 tensor (CUDA autocast runs LayerNorm in float32, and the
      LayerNorm saves its float32 input): kept in the 16-bit dtype it came from, half the bytes,
      and cast up again in backward.

    Both casts are exact, so backward computes on the same values, bit for bit; the cost is an
    elementwise cast per saved tensor in backward. Everything else is saved as autograd saves it.
    """

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        self._low = WeakIdKeyDictionary()  # float32 tensor -> its one 16-bit copy

    def pack(self, t: torch.Tensor):
        base = t if t._base is None else t._base
        fn = base.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0" or not base.is_contiguous():
            return t
        node, nr = fn.next_functions[0]
        if base.dtype in _LOW and type(node).__name__ == "AccumulateGrad":
            p = node.variable
            if p.shape == base.shape and p.is_contiguous() and p.dtype != base.dtype:
                return _Recast(p, base.dtype, t)
            return t
        if base.dtype == torch.float32 and node is not None:
            try:
                src_dtype = node._input_metadata[nr].dtype
            except (AttributeError, IndexError, RuntimeError):
                return t
            if src_dtype in _LOW:
                low = self._low.get(base)
                if low is None:
                    low = self._low[base] = base.to(src_dtype)  # exact: base holds 16-bit values
                return _Recast(low, torch.float32, t)
        return t

    @staticmethod
    def unpack(x):
        return x.get() if isinstance(x, _Recast) else x

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def saved_casts_context(x: torch.Tensor):
    """``SavedCasts`` hooks where they can apply (autograd recording under autocast, not while
    torch.compile traces, saved-tensor hooks allowed), else a null context."""
    if not SAVED_CASTS or not torch.is_grad_enabled() or not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if enabled is not None and not enabled():
        return contextlib.nullcontext()
    return SavedCasts().hooks()


def uncached_weight_casts(x: torch.Tensor):
    """Autocast's weight-cast cache off inside the blocks. The cache keeps the bf16/fp16 copy of
    every parameter it cast until the outermost autocast region ends, so at the end of forward a
    copy of all the blocks' weights is alive, whatever backward keeps. Each block weight is used
    once per forward, so uncached casts are the same number of casts of the same values.
    A plain function returning a context (not a generator context manager): torch.compile of
    torch 2.6 cannot trace into the latter, and while compiling there is nothing to do."""
    if not SAVED_CASTS or torch.compiler.is_compiling() or not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return _AutocastCacheOff()


class _AutocastCacheOff:
    def __enter__(self):
        self.prev = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)

    def __exit__(self, *exc):
        torch.set_autocast_cache_enabled(self.prev)
        return False


# ``False``: blocks save what autograd saves and autocast caches its weight casts (the
# behaviour before ``SavedCasts``; for comparisons and tests).
SAVED_CASTS = True


@contextlib.contextmanager
def saved_casts_enabled(enabled: bool):
    """Switch ``SavedCasts`` and ``uncached_weight_casts`` on or off inside the context."""
    global SAVED_CASTS
    prev, SAVED_CASTS = SAVED_CASTS, bool(enabled)
    try:
        yield
    finally:
        SAVED_CASTS = prev
