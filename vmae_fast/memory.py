"""Activation memory: the checkpointing policies of the transformer blocks, and an exact count of
the bytes a train step keeps alive.

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

``LiveTensorMemory`` counts the bytes of live tensor storages op by op (a ``TorchDispatchMode``
that sees every allocation; a weak reference per storage sees every free), so its peak is exact,
independent of the device and of any allocator's caching, and includes what checkpointing
recomputes in backward. ``measure_train_step`` runs one train step under it and splits the peak
into parameters, gradients, optimizer state and activations.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
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


# --------------------------------------------------------------------- CUDA autocast rules on CPU
# Ops that CUDA autocast runs in float32 and CPU autocast leaves in the input's dtype (torch's
# autocast_mode.cpp lists; the ones these models and their losses can reach). ``_FP32``: inputs
# cast to float32. ``_FP32_DTYPE``: called with ``dtype=float32`` unless a dtype is given.
_FP32 = ("layer_norm", "native_layer_norm", "group_norm", "exp", "expm1", "log", "log1p", "log2", "log10",
         "reciprocal", "rsqrt", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "softplus", "logsumexp",
         "cosine_similarity", "cdist", "dist", "renorm")
_FP32_DTYPE = ("softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "prod", "prod.dim_int", "cumsum",
               "cumprod", "linalg_vector_norm")


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
        and t.device.type == "cpu"


def _cast_fp32(x):
    if _eligible(x) and x.dtype != torch.float32:
        return x.to(torch.float32)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_fp32(v) for v in x)
    return x


@contextlib.contextmanager
def cuda_autocast_rules():
    """Under CPU autocast, run the ops CUDA autocast runs in float32 (``_FP32``, ``_FP32_DTYPE``) in
    float32 too, so that a CPU run holds the tensors, dtypes and bytes a GPU run holds (e.g.
    LayerNorm: CPU autocast keeps a bf16 input in bf16; CUDA casts it to float32, and the float32
    copy is what LayerNorm saves for backward). Ops that CPU autocast already handles are left
    alone. The rules are registered for the ``AutocastCPU`` dispatch key while the context is
    open and removed after."""
    lib = torch.library.Library("aten", "IMPL")
    key = torch._C.DispatchKey.AutocastCPU
    exclude = torch._C.DispatchKeySet(key)

    def rule(op, dtype_arg):
        names = [a.name for a in op._schema.arguments]
        di = names.index("dtype") if dtype_arg and "dtype" in names else None
        kw_only = di is not None and op._schema.arguments[di].kwarg_only

        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                if di is None:
                    return op(*_cast_fp32(args), **_cast_fp32(kwargs))
                given = kwargs.get("dtype") if kw_only or len(args) <= di else args[di]
                if given is None and args and _eligible(args[0]):
                    if kw_only or len(args) <= di:
                        kwargs = {**kwargs, "dtype": torch.float32}
                    else:
                        args = (*args[:di], torch.float32, *args[di + 1:])
                return op(*args, **kwargs)
        return kernel

    for names, dtype_arg in ((_FP32, False), (_FP32_DTYPE, True)):
        for name in names:
            base, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, base, None)
            op = getattr(packet, overload or "default", None) if packet is not None else None
            qual = f"aten::{name}"
            if op is None or torch._C._dispatch_has_kernel_for_dispatch_key(qual, "AutocastCPU"):
                continue
            lib.impl(name, rule(op, dtype_arg), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


# ------------------------------------------------------------------------------ exact counting
def _storage(t) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # subclasses without a storage
        return None


CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "inputs", "activations")


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storages, op by op, exactly.

    Every op's inputs and outputs pass through this mode. An output storage seen for the first
    time is an allocation; a weak reference on it reports its free (a storage is freed when the
    last tensor or autograd node holding it goes, wherever that happens, also on the autograd
    engine's threads). A storage first seen as an op *input* existed before the region (a buffer,
    a cached table): it is ``external``, counted apart and never as an allocation.
    ``register(category, tensors)`` names storages that exist before the region (parameters,
    gradients, optimizer state, inputs): they count from the start.

    What it cannot see: scratch memory a kernel allocates and frees inside one op (never a
    tensor of the program), and allocator rounding/caching. That is the point: the count is the
    program's own, the same on every device for the same ops and dtypes.
    ``events``: ``(storage id, +-bytes, phase)`` in order (ids are unique per storage lifetime;
    ``(0, mark, phase)`` marks a phase start, ``(-1, mark, op)`` the end of an op); ``peaks()``
    replays them.
    """

    def __init__(self):
        super().__init__()
        self.phase = "setup"
        self.events: list[tuple[int, int, str]] = []
        self._uid: dict[int, int] = {}  # storage address -> id, while the storage lives
        self._nbytes: dict[int, int] = {}  # id -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.category: dict[int, str] = {}  # id -> registered category ("external" included)
        self._next = 1
        self._closed = False
        self._marks: dict[int, object] = {}  # storage address -> mark (``mark``)
        self.mark = None

    # ---- bookkeeping
    def _freed(self, addr: int, uid: int, _ref) -> None:
        if self._closed:
            return
        if self._uid.get(addr) == uid:
            del self._uid[addr]
        self._refs.pop(uid, None)
        n = self._nbytes.pop(uid, None)
        if n is not None:
            self.events.append((uid, -n, self.phase))

    def _track(self, s: torch.UntypedStorage, category: str | None = None) -> None:
        addr = s._cdata
        n = s.nbytes()
        uid = self._uid.get(addr)
        if uid is not None:
            if n != self._nbytes[uid]:  # resized in place
                self.events.append((uid, n - self._nbytes[uid], self.phase))
                self._nbytes[uid] = n
            return
        uid = self._next
        self._next += 1
        self._uid[addr] = uid
        self._nbytes[uid] = n
        self._refs[uid] = weakref.ref(s, functools.partial(self._freed, addr, uid))
        if category is not None:
            self.category[uid] = category
        self.events.append((uid, n, self.phase))

    def register(self, category: str, tensors: Iterable) -> None:
        """Count the storages of ``tensors`` (existing before the region) as ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        for t in tensors:
            s = _storage(t)
            if s is not None and s._cdata not in self._uid:
                self._track(s, category)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.events.append((0, self.mark, phase))

    def mark_storages(self, mark, tensors: Iterable) -> None:
        """An op that reads one of ``tensors`` (e.g. a block's parameters) sets ``self.mark`` to
        ``mark`` until an op reads tensors of another mark: each timeline row says which part
        of the model last ran."""
        for t in tensors:
            s = _storage(t)
            if s is not None:
                self._marks[s._cdata] = mark

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            s = _storage(t)
            if s is not None:
                if s._cdata not in self._uid:
                    self._track(s, "external")
                if self._marks and s._cdata in self._marks:
                    self.mark = self._marks[s._cdata]
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            s = _storage(t)
            if s is not None:
                self._track(s)
        # after an op's outputs: the live bytes can only have grown since the last op here
        self.events.append((-1, self.mark, func))
        return out

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.close()

    def close(self) -> None:
        """Stop recording frees (storages freed later are not this region's)."""
        self._closed = True
        self._refs.clear()

    def id_of(self, t: torch.Tensor) -> int | None:
        """The id of a live tensor's storage, ``None`` if it was never seen."""
        s = _storage(t)
        return None if s is None else self._uid.get(s._cdata)

    def external_bytes(self) -> int:
        """Bytes of the storages first seen as op inputs (they existed before the region)."""
        return sum(n for uid, n, _ in self.events if uid > 0 and n > 0 and self.category.get(uid) == "external")

    # ---- replay
    def peaks(self, classify: Callable[[int], str], activation_phases: Iterable[str] = ("forward", "backward")
              ) -> dict:
        """Replay the events with each storage's category (``classify(key)`` for storages not
        registered). Returns the total peak and its split, per-phase total peaks, the peak of
        activation bytes over ``activation_phases`` with the gradient bytes live at that moment,
        and each category's bytes at every phase start and at the end."""
        cur = dict.fromkeys(CATEGORIES, 0)
        cat_of: dict[int, str] = {}
        act_phases = set(activation_phases)
        peak_total, at_peak, peak_phase = -1, {}, None
        phase_peak: dict[str, int] = {}
        act_peak, act_at = 0, {}
        at_phase_start: dict[str, dict] = {}
        phase = "setup"
        timeline = []
        for key, delta, ph in self.events:
            if key == 0:
                phase = ph
                at_phase_start.setdefault(ph, dict(cur))
                timeline.append((phase, "phase", delta, *cur.values()))
                continue
            if key == -1:
                timeline.append((phase, str(ph), delta, *cur.values()))
                continue
            c = cat_of.get(key)
            if c is None:
                c = cat_of[key] = self.category.get(key) or classify(key)
            if c == "external":
                continue
            cur[c] += delta
            if delta <= 0:
                continue
            total = sum(cur.values())
            if total > peak_total:
                peak_total, at_peak, peak_phase = total, dict(cur), phase
            phase_peak[phase] = max(phase_peak.get(phase, 0), total)
            if phase in act_phases and cur["activations"] > act_peak:
                act_peak, act_at = cur["activations"], dict(cur)
        return {"peak_total": peak_total, "at_peak": at_peak, "peak_phase": peak_phase,
                "phase_peaks": phase_peak, "peak_activations": act_peak, "at_activation_peak": act_at,
                "at_phase_start": at_phase_start, "at_end": dict(cur), "timeline": timeline}


# --------------------------------------------------------------------------- one train step
@dataclass
class StepMemory:
    """Exact bytes of one train step (``measure_train_step``); all values in bytes.

    ``peak_total``: live tensor bytes at the step's high-water mark, ``at_peak`` its split into
    ``CATEGORIES`` (``activations``: every tensor of the step that is not a parameter, buffer,
    gradient, optimizer state or input: saved activations, recomputed ones, temporaries, their
    gradients, optimizer temporaries). ``peak_activations``: the high-water mark of activation
    bytes during forward + backward. ``held_after_forward``: activation bytes alive when backward
    starts (what autograd and checkpointing keep). ``phase_peaks``: the total's high-water mark
    per phase (``zero_grad``, ``forward``, ``backward``, ``optimizer``). ``cuda_*``: torch's
    allocator counters over the same step (CUDA only), to compare."""

    peak_total: int
    at_peak: dict
    peak_phase: str
    peak_activations: int
    at_activation_peak: dict
    held_after_forward: int
    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    inputs: int
    phase_peaks: dict
    external: int
    cuda_max_allocated: int | None = None
    cuda_base_allocated: int | None = None
    meta: dict = field(default_factory=dict)
    # ``(phase, op, mark, *bytes per CATEGORIES)`` at each phase start (op ``"phase"``) and after
    # each op (where the live bytes are at a local high: only ops allocate), in order; ``mark``:
    # see ``LiveTensorMemory.mark_storages``; not in ``to_dict()``
    timeline: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "timeline"}


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def measure_train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], optimizer=None, *,
                       inputs: Iterable = (), autocast_dtype: torch.dtype | None = None,
                       warmup_steps: int | str = 1, cuda_rules: bool | None = None,
                       marks: Iterable = ()) -> StepMemory:
    """Exact memory of one train step of ``model``: ``zero_grad(set_to_none=True)``, ``loss_fn()``
    under autocast (``autocast_dtype``, none for ``None``/float32), ``backward``,
    ``optimizer.step()``. ``warmup_steps`` steps run first (``"prime"``: a cheaper start, the
    same state: a forward without autograd, then zero gradients and one optimizer step), so that
    the measured one starts as
    every later step does: gradients of the previous step alive, optimizer state allocated.
    ``inputs``: tensors fed to the step (clip, masks), counted as inputs. ``cuda_rules`` (default:
    on for CPU autocast): run under ``cuda_autocast_rules``, so that the count is a GPU's.
    ``marks``: ``(mark, tensors)`` pairs for ``LiveTensorMemory.mark_storages``."""
    device = next(model.parameters()).device
    autocast = autocast_dtype is not None and autocast_dtype != torch.float32
    if cuda_rules is None:
        cuda_rules = autocast and device.type == "cpu"
    with cuda_autocast_rules() if cuda_rules else contextlib.nullcontext():
        m = _measure(model, loss_fn, optimizer, inputs, autocast_dtype if autocast else None, warmup_steps, device,
                     marks)
    m.meta["cuda_autocast_rules"] = bool(cuda_rules)
    return m


def _measure(model, loss_fn, optimizer, inputs, autocast_dtype, warmup_steps, device, marks) -> StepMemory:
    autocast = autocast_dtype is not None

    def step(mark: Callable[[str], None]):
        mark("zero_grad")
        model.zero_grad(set_to_none=True)
        mark("forward")
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast):
            loss = loss_fn()
        mark("backward")
        loss.backward()
        mark("optimizer")
        if optimizer is not None:
            optimizer.step()
        mark("end")

    if warmup_steps == "prime":
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast):
            loss_fn()  # lazily built tables and caches, as a first step would build them
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        if optimizer is not None:
            optimizer.step()
    else:
        for _ in range(warmup_steps):
            step(lambda _: None)
    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    params = list(model.parameters())
    tracker = LiveTensorMemory()
    tracker.register("parameters", params)
    tracker.register("buffers", model.buffers())
    tracker.register("gradients", [p.grad for p in params if p.grad is not None])
    tracker.register("optimizer_state", _optimizer_tensors(optimizer))
    tracker.register("inputs", inputs)
    for mark, tensors in marks:
        tracker.mark_storages(mark, tensors)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    with tracker:
        step(tracker.set_phase)
    if cuda:
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device)
    grads = {tracker.id_of(p.grad) for p in params if p.grad is not None}
    opt = {tracker.id_of(t) for t in _optimizer_tensors(optimizer)}

    def classify(key: int) -> str:
        return "gradients" if key in grads else "optimizer_state" if key in opt else "activations"

    r = tracker.peaks(classify)
    end = r["at_end"]
    bwd = r["at_phase_start"].get("backward", {})
    return StepMemory(
        peak_total=r["peak_total"], at_peak=r["at_peak"], peak_phase=r["peak_phase"],
        peak_activations=r["peak_activations"], at_activation_peak=r["at_activation_peak"],
        held_after_forward=bwd.get("activations", 0),
        parameters=end["parameters"], buffers=end["buffers"], gradients=end["gradients"],
        optimizer_state=end["optimizer_state"], inputs=end["inputs"], phase_peaks=r["phase_peaks"],
        external=tracker.external_bytes(),
        cuda_max_allocated=cuda_peak if cuda else None, cuda_base_allocated=cuda_base if cuda else None,
        timeline=r["timeline"],
        meta={"autocast": str(autocast_dtype).replace("torch.", "") if autocast else "float32",
              "events": len(tracker.events), "torch": torch.__version__})
