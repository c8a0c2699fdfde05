"""The exact count of the bytes a train step keeps alive: what measures the activation-memory
policies (``memory.py``), for the benchmarks (``bench.memory``, ``bench.runner``), the tests and
anyone sizing a batch.

``LiveTensorMemory`` counts the bytes of live tensor storages op by op (a ``TorchDispatchMode``
that sees every allocation; a weak reference per storage sees every free), so its peak is exact,
independent of the device and of any allocator's caching, and includes what checkpointing
recomputes in backward. ``measure_train_step`` runs one train step under it and splits the peak
into parameters, gradients, optimizer state and activations. ``cuda_autocast_rules`` makes a CPU
run under autocast hold the dtypes (and so the bytes) a GPU run holds.
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
