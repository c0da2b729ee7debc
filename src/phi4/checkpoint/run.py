"""A training run's checkpoints: `<run_dir>/checkpoints/step_0000100/` holds every part of the
run's `states` dict, each under its key: the model chunks and the distributed optimizer's state as
sharded tensors (the optimizer in the fully reshardable format, so a run resumes under another
TP/PP/DP layout), the scheduler and the TrainState as plain values; then each rank's RNG states and
the run's description (the resolved config, the layout, the weights' fingerprint). Saving is
collective, optionally in the background; `latest` names a checkpoint only once every rank has
written it (phi4.checkpoint.pointers)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

from phi4.checkpoint.integrity import check_written
from phi4.checkpoint.pointers import FINAL, checkpoint_dir, latest_checkpoint, publish, require_checkpoint
from phi4.checkpoint.rng import rng_sharded_object, rng_state, set_rng_state
from phi4.checkpoint.weights import (
    assign_model,
    load_sharded,
    model_sharded_state_dict,
    save_strategy,
    with_keyed_train_state,
)
from phi4.runtime import device

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _fault_point(directory: Path) -> None:
    """Fault injection for the crash tests: PHI4_FAULT=kill_before_publish:<step> SIGKILLs this
    process after the checkpoint's data is written but before `latest` names it."""
    fault = os.environ.get("PHI4_FAULT", "")
    if fault.startswith("kill_before_publish:") and directory.name == f"step_{int(fault.split(':')[1]):07d}":
        os.kill(os.getpid(), signal.SIGKILL)


def _slowed_writer(request):
    """Fault injection for the abandoned-save test: PHI4_FAULT=slow_async_write:<seconds> makes a
    background save's writer process sleep that long before it writes (a slow filesystem)."""
    fault = os.environ.get("PHI4_FAULT", "")
    if request.async_fn is None or not fault.startswith("slow_async_write:"):
        return request
    seconds, write = float(fault.split(":")[1]), request.async_fn

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    return request._replace(async_fn=slow_write)


class CheckpointWriteError(RuntimeError):
    """A save whose files are not what its `.metadata` describes: it is left unpublished."""


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam (what Megatron-Core uses without TE or apex) creates its state lazily, and the
    distributed optimizer can only describe (and so load) state that exists (docs/cpu_backend.md, "10").
    Megatron-Core's own helper fills it with placeholders that the load then overwrites; there is
    no public equivalent."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _keep_restored_adam_step(optimizer) -> None:
    """Work around megatron-core 0.19.2 with torch's Adam (docs/cpu_backend.md, "10"): loading the fully
    reshardable format drops each parameter's "step" from the tensors it copies in, then asks for
    it (KeyError: 'step'). By then the distributed optimizer has already set "step" from the
    checkpoint's param groups, so the copy should leave it as it is: give the copy that same
    tensor. It also shares one step tensor among all parameters, which Adam then advances once
    per parameter; each gets its own copy. TE's and apex's fused Adam keep no per-parameter step
    and never reach this."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        copy_in = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if copy_in is None or getattr(copy_in, "_phi4_keeps_step", False):
            continue

        def keep_step(model_param, tensors, inner=inner, copy_in=copy_in):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            state = inner.optimizer.state.get(main_param, {})
            if isinstance(state.get("step"), torch.Tensor):
                # The load handed every parameter the same step tensor, which Adam would then
                # advance once per parameter per update: give each its own.
                state["step"] = state["step"].clone()
                if "step" not in tensors:
                    tensors = {**tensors, "step": state["step"]}
            copy_in(model_param, tensors)

        keep_step._phi4_keeps_step = True
        inner._set_main_param_and_optimizer_states = keep_step


@runtime_checkable
class Stateful(Protocol):
    """A part saved as plain values under its key (torch.distributed.checkpoint's Stateful)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


@runtime_checkable
class ShardedStateful(Protocol):
    """A part saved as sharded tensors (Megatron-Core's dist_checkpointing)."""

    def sharded_state_dict(self, before: dict, is_loading: bool) -> dict:
        """Its entries of the checkpoint's sharded state; `before` holds those of the parts before it."""

    def load_sharded_state_dict(self, loaded: dict, directory: Path) -> None:
        """Take its entries back from the loaded state."""


class ModelChunks:
    """The model, one sharded entry per virtual pipeline stage ("model0", "model1", ...)."""

    def __init__(self, chunks: list):
        self.chunks = chunks

    def sharded_state_dict(self, before: dict, is_loading: bool) -> dict:
        return model_sharded_state_dict(self.chunks, with_extra_state=True)

    def load_sharded_state_dict(self, loaded: dict, directory: Path) -> None:
        assign_model(self.chunks, loaded, directory)


class DistributedOptimizerState:
    """Megatron-Core's (distributed) optimizer, in the fully reshardable format, under "optimizer";
    its sharded state refers to the model's, so it comes after ModelChunks in `states`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def sharded_state_dict(self, before: dict, is_loading: bool) -> dict:
        if is_loading:
            _materialize_optimizer_state(self.optimizer)
        return {"optimizer": self.optimizer.sharded_state_dict(before, is_loading=is_loading,
                                                               metadata=OPTIM_METADATA)}

    def load_sharded_state_dict(self, loaded: dict, directory: Path) -> None:
        _keep_restored_adam_step(self.optimizer)
        self.optimizer.load_state_dict(loaded["optimizer"])


def run_states(chunks: list, optimizer, scheduler, train_state: Stateful) -> dict:
    """A training run's parts, in the order they are saved and restored: the model chunks, the
    optimizer, the scheduler, the TrainState. More parts go after them under keys of their own."""
    return {"model": ModelChunks(chunks), "optimizer": DistributedOptimizerState(optimizer),
            "scheduler": scheduler, "train_state": train_state}


class RunCheckpointer:
    """Saves and restores a training run: every part of `states` (sharded parts as tensors,
    Stateful ones as plain values under their key), each rank's RNG states, and `describe()`'s
    plain values (the run's config, layout, weights' fingerprint), which nothing restores: they
    are read by the checks and tools (phi4.checkpoint.weights.checkpoint_common_state).

    The RNG states are restored only into the TP/PP/DP/CP `layout` they were saved at (one per
    model-parallel rank); under another they stay as seeded."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool, states: dict,
                 describe: Callable[[], dict] = dict, layout: Optional[dict] = None):
        for key, part in states.items():
            if not isinstance(part, (ShardedStateful, Stateful)):
                raise TypeError(f"states[{key!r}]: {type(part).__name__} has neither state_dict/load_state_dict "
                                "nor sharded_state_dict/load_sharded_state_dict")
        self.run_dir, self.keep, self.async_save = Path(run_dir), keep, async_save
        self.states, self.describe, self.layout = states, describe, layout
        self._queue = None
        self.pending: Optional[Path] = None  # a background save not yet published

    def _sharded(self, is_loading: bool) -> dict:
        state: dict = {}
        for part in self.states.values():
            if isinstance(part, ShardedStateful):
                state.update(part.sharded_state_dict(state, is_loading))
        state["rng_state"] = rng_sharded_object(None if is_loading else rng_state())
        return state

    def save(self, step: int, final: bool = False) -> Path:
        """Collective. A checkpoint of every part at `step`; `final`: the run's last, which
        `checkpoints/final` will name. Returns the directory."""
        directory = checkpoint_dir(self.run_dir, step)
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete earlier attempt at this step
            directory.mkdir(parents=True)
        torch.distributed.barrier()
        state = self._sharded(is_loading=False)
        for key, part in self.states.items():
            if not isinstance(part, ShardedStateful):
                state[key] = part.state_dict()
        state.update(self.describe())
        if not self.async_save:
            dist_checkpointing.save(state, str(directory), sharded_strategy=save_strategy())
            self._finish(directory, final)
            return directory
        self.wait()
        # "mcore": Megatron-Core's own background writer ("nvrx" needs nvidia-resiliency-ext)
        request = dist_checkpointing.save(state, str(directory), sharded_strategy=save_strategy(),
                                          async_sharded_save=True, async_strategy="mcore")
        request = _slowed_writer(request)
        request.add_finalize_fn(lambda: self._finish(directory, final))
        self._queue = self._queue or AsyncCallsQueue()
        self._queue.schedule_async_request(request)
        self.pending = directory
        return directory

    def _finish(self, directory: Path, final: bool) -> None:
        """Publish a written checkpoint, once every rank has found its own files to be what the
        `.metadata` says they are (otherwise nothing names it, and every rank raises)."""
        torch.distributed.barrier()  # every rank's shards and rank 0's .metadata are on disk
        _fault_point(directory)
        rank = torch.distributed.get_rank()
        problem = check_written(directory, rank)
        bad = device.current().put(torch.tensor([problem is not None], dtype=torch.int32))
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            self.pending = None
            raise CheckpointWriteError(
                f"{directory} was not written as its .metadata describes ({problem or 'on another rank'}); it is "
                f"not published, and `latest` still names {latest_checkpoint(self.run_dir) or 'nothing'}")
        if rank == 0:
            publish(self.run_dir, directory, self.keep, final)
        torch.distributed.barrier()
        self.pending = None

    def abandon(self) -> None:
        """After a failure on this rank alone: a background save still being written is given up
        (its writer process killed), and what its writer reported is discarded. Megatron-Core's
        writers report their files' byte offsets to one queue per process, and a save's
        `.metadata` takes the first report it finds there: an abandoned save's report would
        become the next save's, and that checkpoint's offsets would point into the wrong bytes.
        No collective: the other ranks may be gone. The abandoned directory has no `.metadata`
        and nothing names it."""
        if self._queue is None:
            return
        for call in self._queue.async_calls:
            writer = getattr(call.async_caller, "process", None)
            if writer is not None:
                writer.kill()
                writer.join()
        self._queue.async_calls.clear()
        self._queue, self.pending = None, None
        reports = get_write_results_queue()
        while True:
            try:
                reports.get_nowait()
            except queue.Empty:
                break

    def name_final(self, directory: Path) -> bool:
        """Collective. Have `checkpoints/final` name `directory` (a run's last step) if nothing does;
        True when it did not."""
        missing = not (self.run_dir / "checkpoints" / FINAL).exists()
        if missing and torch.distributed.get_rank() == 0:
            publish(self.run_dir, directory, self.keep, final=True)
        torch.distributed.barrier()
        return missing

    def newest(self) -> str:
        """The run's newest checkpoint, for messages: a background save not yet published is named
        as such (the trainer finishes it before the run ends on every rank together)."""
        if self.pending is not None:
            return f"{self.pending} (still being written; `latest` names it once the run has closed)"
        found = latest_checkpoint(self.run_dir)
        return str(found) if found is not None else "none (no checkpoint saved yet)"

    def poll(self) -> None:
        """Finalize background saves that have finished (call once a step)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def load(self, directory: Path) -> dict:
        """Restore every part from `directory` (collective), in the order of `states`; returns the
        checkpoint's plain values (the description it was saved with, each plain part's state). A
        checkpoint written before the parts had keys of their own (its TrainState's values flat
        among the description's) loads alike."""
        require_checkpoint(directory)
        common = with_keyed_train_state(dist_checkpointing.load_common_state_dict(str(directory)))
        same_layout = self.layout is not None and common.get("layout") == self.layout
        state = self._sharded(is_loading=True)
        if not same_layout:
            state.pop("rng_state")
        loaded = load_sharded(state, directory)
        for key, part in self.states.items():
            if isinstance(part, ShardedStateful):
                part.load_sharded_state_dict(loaded, directory)
            elif key in common:  # a part added after the checkpoint was written keeps its own state
                part.load_state_dict(common[key])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        return common
