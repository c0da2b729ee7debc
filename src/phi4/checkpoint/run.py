"""A training run's checkpoints: `<run_dir>/checkpoints/step_0000100/` holds the model, the
distributed optimizer's state (in the fully reshardable format, so a run resumes under another
TP/PP/DP layout), the scheduler, each rank's RNG states and the run's plain values (its
TrainState, the resolved config, the layout). Saving is collective, optionally in the background;
`latest` names a checkpoint only once every rank has written it (phi4.checkpoint.pointers)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

from phi4.checkpoint.integrity import check_written
from phi4.checkpoint.pointers import FINAL, checkpoint_dir, latest_checkpoint, publish, require_checkpoint
from phi4.checkpoint.rng import rng_sharded_object, rng_state, set_rng_state
from phi4.checkpoint.weights import assign_model, load_sharded, model_sharded_state_dict, save_strategy
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
    distributed optimizer can only describe (and so load) state that exists (MEGATRON_CPU.md, 10).
    Megatron-Core's own helper fills it with placeholders that the load then overwrites; there is
    no public equivalent."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _keep_restored_adam_step(optimizer) -> None:
    """Work around megatron-core 0.19.2 with torch's Adam (MEGATRON_CPU.md, 10): loading the fully
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


class RunCheckpointer:
    """Saves and restores a training run: model, optimizer, scheduler, RNG, and the plain values
    the trainer hands over (its TrainState, the config, the layout)."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool):
        self.run_dir, self.keep, self.async_save = Path(run_dir), keep, async_save
        self._queue = None
        self.pending: Optional[Path] = None  # a background save not yet published

    def _state(self, chunks, optimizer, scheduler, extra: dict, is_loading: bool) -> dict:
        if is_loading:
            _materialize_optimizer_state(optimizer)
        state = model_sharded_state_dict(chunks, with_extra_state=True)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_METADATA)
        state["rng_state"] = rng_sharded_object(None if is_loading else rng_state())
        state["scheduler"] = scheduler.state_dict()
        state.update(extra)
        return state

    def save(self, step: int, chunks, optimizer, scheduler, extra: dict, final: bool = False) -> Path:
        """Collective. `extra`: plain values (data position, config); `final`: the run's last
        checkpoint, which `checkpoints/final` will name. Returns the directory."""
        directory = checkpoint_dir(self.run_dir, step)
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete earlier attempt at this step
            directory.mkdir(parents=True)
        torch.distributed.barrier()
        state = self._state(chunks, optimizer, scheduler, extra, is_loading=False)
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

    def load(self, directory: Path, chunks, optimizer, scheduler, layout: dict) -> dict:
        """Restore everything saved; returns the checkpoint's plain values (step, data position,
        the layout it was saved at...). Saved under another `layout`, the RNG states (one per
        TP/PP rank) are left as seeded instead of restored."""
        require_checkpoint(directory)
        common = dist_checkpointing.load_common_state_dict(str(directory))
        same_layout = common.get("layout") == layout
        state = self._state(chunks, optimizer, scheduler, {}, is_loading=True)
        state.pop("scheduler")
        if not same_layout:
            state.pop("rng_state")
        loaded = load_sharded(state, directory)
        assign_model(chunks, loaded, directory)
        _keep_restored_adam_step(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        return common
