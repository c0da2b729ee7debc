"""The CPU backend: lets Megatron-Core run over gloo on a machine without CUDA.

Megatron-Core assumes a GPU in a handful of places (see docs/cpu_backend.md): CUDA device
arguments in tensor factories, `Tensor.cuda()`, `torch.cuda` streams, events and synchronisation,
parameter type checks against `torch.cuda.*Tensor`, and an RNG tracker that keeps CUDA generator
states. `activate()` redirects each of them to the CPU. It refuses to run where CUDA exists, so a
GPU run never passes through this module.

`activate()` runs these steps in order (each a function below, named in its INFO line):

1. `_replace_cuda_functions`: torch.cuda's device, stream, memory, NVTX and seeding functions
   become CPU stand-ins (the originals kept).
2. `_replace_rng_tracker`: Megatron-Core's RNG tracker becomes `CpuRNGStatesTracker` (the
   originals kept).
3. `_end_children_with_this_process`: processes forked from here end with this one.
4. `_fork_checkpoint_writer_manager`: dist_checkpointing's writer-results Manager starts by fork.
5. `_set_malloc_mmap_threshold`: glibc's mmap threshold 1 GiB, unless MALLOC_MMAP_THRESHOLD_ is
   set (then the environment's value rules); one INFO line says which.
6. `_enter_cuda_to_cpu_mode`: the TorchFunctionMode `_CudaToCpu` is entered, for the process.

`deactivate()` undoes 6, 2 and 1; 3, 4 and 5 stay for the life of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

import torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode, _get_current_function_mode

from phi4.runtime import signals

log = logging.getLogger(__name__)

_ACTIVE_MODE: "_CudaToCpu | None" = None

# What the steps replaced, in order: (owner, attribute, original), original _MISSING for none.
_REPLACED: list[tuple[object, str, object]] = []
_MISSING = object()

# What `Tensor.type()` reports for a CPU tensor, as Megatron-Core's optimizers expect of a GPU one.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch names a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps every CUDA device argument to the CPU and makes `.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(func, args, kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        return func(*args, **kwargs)

    def _backward(self, func, args, kwargs):
        # torch pops a mode while its handler runs, so a backward pass started from here would run
        # every backward function (which allocate with CUDA devices too) outside the mode. Put
        # the mode back and call the autograd engine directly, as Megatron-Core's own
        # custom_backward does.
        names = ("gradient" if func is torch.Tensor.backward else "grad_tensors", "retain_graph", "create_graph")
        options = dict(zip(names, args[1:]), **kwargs)
        tensors = args[0] if "tensors" not in kwargs else kwargs.pop("tensors")
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = options.get("gradient", options.get("grad_tensors"))
        grads = (grads,) if grads is None or isinstance(grads, torch.Tensor) else tuple(grads)
        if len(grads) == 1 and len(tensors) > 1:
            grads = grads * len(tensors)
        grads = tuple(torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads))
        create_graph = bool(options.get("create_graph") or False)
        retain_graph = options.get("retain_graph")
        inputs = options.get("inputs") or ()
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        with self:
            torch.autograd.Variable._execution_engine.run_backward(
                tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph, inputs,
                allow_unreachable=True, accumulate_grad=True,
            )


class _NoStream:
    """Stands in for torch.cuda.Stream / Event: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _returns(value):
    """A fresh stand-in function per patched name (torch.compile keys its rules by function)."""

    def stand_in(*args, **kwargs):
        return value() if callable(value) else value

    return stand_in


class CpuRNGStatesTracker:
    """Megatron-Core's RNG tracker for the CPU: each named region owns a generator state.

    Inside `fork(name)` the CPU default generator runs on the region's own state, which is saved
    back on exit, so dropout in tensor-parallel regions draws independent streams as it does on a
    GPU, and the default stream outside is left where it was.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def is_active() -> bool:
    return _ACTIVE_MODE is not None


def _replace(owner, name: str, value) -> None:
    """`owner.name = value`, the original kept for `deactivate()`."""
    _REPLACED.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


def _replace_cuda_functions() -> None:
    """torch.cuda's device, stream, memory, NVTX and seeding functions as CPU stand-ins: Megatron-Core uses them."""
    cuda = torch.cuda
    _replace(cuda, "current_device", _returns(0))
    _replace(cuda, "set_device", _returns(None))
    _replace(cuda, "synchronize", _returns(None))
    _replace(cuda, "empty_cache", _returns(None))
    _replace(cuda, "Stream", _NoStream)
    _replace(cuda, "Event", _NoStream)
    _replace(cuda, "current_stream", _returns(_NoStream))
    _replace(cuda, "default_stream", _returns(_NoStream))
    _replace(cuda, "stream", _returns(contextlib.nullcontext))
    _replace(cuda, "set_stream", _returns(None))
    _replace(cuda, "is_current_stream_capturing", _returns(False))
    _replace(cuda, "memory_allocated", _returns(0))
    _replace(cuda, "max_memory_allocated", _returns(0))
    _replace(cuda, "memory_reserved", _returns(0))
    _replace(cuda, "reset_peak_memory_stats", _returns(None))
    _replace(cuda, "memory_stats", _returns(dict))
    _replace(cuda.nvtx, "range_push", _returns(None))
    _replace(cuda.nvtx, "range_pop", _returns(None))
    _replace(cuda.nvtx, "range", _returns(contextlib.nullcontext))
    # The RNG tracker's seeding calls torch.cuda.manual_seed; on the CPU the CPU generator is seeded.
    _replace(cuda, "manual_seed", _returns(None))
    _replace(cuda, "manual_seed_all", _returns(None))
    # Activation recomputation saves and restores "the CUDA generator" around each checkpointed
    # region; on the CPU the CPU generator (restored by the same code) is the one that drew.
    _replace(cuda.random, "get_rng_state", _returns(torch.get_rng_state))
    _replace(cuda, "get_rng_state", cuda.random.get_rng_state)


def _replace_rng_tracker() -> None:
    """Megatron-Core's RNG tracker as CpuRNGStatesTracker: its own keeps CUDA generator states, absent here."""
    # Its setter of the CUDA generator's state queues a callback for when CUDA initialises, which
    # never happens here: drop it rather than let the queue grow by one state per recomputed layer.
    _replace(mcore_random, "_lazy_call", _returns(None))
    _replace(mcore_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    _replace(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


def _end_children_with_this_process() -> None:
    """Processes forked from here (the next step's Manager) end with this one, for in-process users too."""
    signals.end_children_with_this_process()


def _fork_checkpoint_writer_manager() -> None:
    """dist_checkpointing's writer-results Manager started by fork now, not by spawn at the first save (1.7 s)."""
    # dist_checkpointing's writer reports through a multiprocessing Manager that it starts by spawn
    # at a process's first save: a new interpreter re-importing the entry module, about 1.7 s of
    # every training process (the tiny model's first save: 4.2 s -> 2.5 s). Spawn guards CUDA, absent
    # here: start that Manager by fork instead (the function caches it for the process).
    get_write_results_queue("fork")


# glibc's mallopt parameter for the size from which malloc maps memory of its own (M_MMAP_THRESHOLD),
# the environment variable through which glibc sets it at start, and the value set here otherwise.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 1 << 30


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _set_malloc_mmap_threshold(limit: int = MMAP_THRESHOLD) -> None:
    """Freed tensor memory up to `limit` is reused by malloc, not unmapped and faulted in afresh each step."""
    # Blocks up to `limit` bytes come from malloc's heap and are reused once freed. By default glibc
    # maps each block over 32 MB on its own and unmaps it when it is freed, so the pages of every
    # step's logits (tokens x 100,352 x 4 bytes) faulted in afresh each step: a 10-step tiny run spent
    # 12 of its 33 CPU-seconds in the kernel, 7 to 9 with this. The cost is resident memory that stays
    # near the step's peak (2.6 GB instead of 2.1 GB for that run). glibc reads MALLOC_MMAP_THRESHOLD_
    # itself when the process starts: where it is set, its value rules. Only glibc has mallopt;
    # elsewhere nothing changes.
    if MMAP_THRESHOLD_ENV in os.environ:
        value = os.environ[MMAP_THRESHOLD_ENV]
        size = f" ({_size(int(value))})" if value.strip().isdigit() else ""
        log.info(f"CPU backend: malloc's mmap threshold {MMAP_THRESHOLD_ENV}={value}{size} "
                 "(glibc read it at start: the environment's value rules; phi4 calls no mallopt)")
        return
    try:
        done = ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, limit)
    except (OSError, AttributeError):
        log.info("CPU backend: malloc's mmap threshold left as it is (no mallopt: not glibc)")
        return
    if done:
        log.info(f"CPU backend: malloc's mmap threshold {_size(limit)} "
                 f"({MMAP_THRESHOLD_ENV} unset; glibc's own env var overrides)")
    else:
        log.info(f"CPU backend: malloc's mmap threshold left as it is (mallopt refused {_size(limit)})")


def _enter_cuda_to_cpu_mode() -> None:
    """CUDA device arguments in every torch call from here on run on the CPU: _CudaToCpu entered, process-wide."""
    global _ACTIVE_MODE
    mode = _CudaToCpu()
    mode.__enter__()
    _ACTIVE_MODE = mode


# activate()'s steps, in order (see the module's docstring).
STEPS = (
    _replace_cuda_functions,
    _replace_rng_tracker,
    _end_children_with_this_process,
    _fork_checkpoint_writer_manager,
    _set_malloc_mmap_threshold,
    _enter_cuda_to_cpu_mode,
)


def activate() -> None:
    """Switch the process to the CPU backend: STEPS, in order. Idempotent; refuses where CUDA is available."""
    if _ACTIVE_MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("phi4.runtime.cpu: CUDA is available; the CPU backend is for CPU-only hosts")
    # Megatron-Core (and through it torch.compile's rule tables) is imported at the top of this module,
    # before the first step replaces anything in torch.cuda, so those tables record the real functions.
    for step in STEPS:
        step()
    log.info("CPU backend active: CUDA device arguments run on the CPU (steps: "
             + ", ".join(step.__name__.lstrip("_") for step in STEPS) + ")")


def deactivate() -> None:
    """Undo what `activate()` can: leave the TorchFunctionMode and put back every torch.cuda function
    and Megatron-Core RNG global it replaced (a tracker state drawn meanwhile is gone with the CPU
    tracker). What stays for the life of the process: the checkpoint writer's Manager (forked, and
    cached by dist_checkpointing), malloc's mmap threshold, and the after-fork hook that ends
    children with this process. Names bound to a stand-in elsewhere (`from torch.cuda import
    current_device` while active) keep it. Does nothing where the backend is not active."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is None:
        return
    top = _get_current_function_mode()
    if top is not _ACTIVE_MODE:
        raise RuntimeError(f"phi4.runtime.cpu: a TorchFunctionMode entered after the CPU backend's "
                           f"({type(top).__name__}) is still active; leave it first")
    _ACTIVE_MODE.__exit__(None, None, None)
    _ACTIVE_MODE = None
    while _REPLACED:
        owner, name, original = _REPLACED.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    log.info("CPU backend inactive: torch.cuda and Megatron-Core's RNG tracker restored "
             "(the writer's Manager, malloc's mmap threshold and the child-ending fork hook stay)")
