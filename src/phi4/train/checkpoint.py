"""Checkpoints: Megatron-Core distributed checkpoints of the model, and of a whole training run.

A run's checkpoint (`<run_dir>/checkpoints/step_0000100/`) holds the model, the distributed
optimizer's state (in the fully reshardable format, so a run resumes under another TP/PP/DP
layout), the scheduler, each rank's RNG states, the data position and the resolved config. The
`latest` file names the newest complete checkpoint; it is replaced atomically only after every
rank has finished writing, so a crash during a save leaves the previous checkpoint as latest.
Weights-only loading (`load_model_weights`) serves converted checkpoints and stage chaining.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from phi4.errors import ConfigError
from phi4.train.safe_load import check_checkpoint

LATEST = "latest"
FINAL = "final"  # names the checkpoint a finished run ended with: what the next stage starts from
MODEL_CONFIG_KEY = "phi4_model"  # the model config in a checkpoint's common state (phi4-convert reads it)
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state_dict(chunks: list, with_extra_state: bool = False) -> dict:
    """{"model0": ..., "model1": ...}: one entry per virtual stage, Megatron-LM's convention."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from phi4.model.build import unwrap

    state = {}
    for i, chunk in enumerate(chunks):
        sharded = unwrap(chunk).sharded_state_dict()
        if not with_extra_state:
            sharded = {k: v for k, v in sharded.items()
                       if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))}
        state[f"model{i}"] = sharded
    return state


def _load(state: dict, directory: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        return dist_checkpointing.load(state, str(directory))
    except (CheckpointingException, KeyError) as err:
        raise ConfigError(f"{directory} does not match this model or layout: {err}") from None


def _assign_model(chunks: list, loaded: dict, directory: Path) -> None:
    from phi4.model.build import unwrap

    for i, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConfigError(f"{directory}: missing {missing}, unexpected {result.unexpected_keys}")


def _require_checkpoint(directory: Path) -> None:
    """A complete torch_dist checkpoint whose files name nothing that could run code."""
    if not (directory / ".metadata").exists():
        raise ConfigError(f"{directory} is not a Megatron-Core torch_dist checkpoint (no .metadata)")
    check_checkpoint(directory)


def resolve_checkpoint(path: str | Path, setting: str = "") -> Path:
    """A checkpoint directory, or a run directory: then its final checkpoint (a stage starts
    from the previous stage's run directory, whose final checkpoint exists only once it ends).
    With `setting`, a refusal names it first (`checkpoint.load=PATH: ...`)."""
    if setting:
        try:
            return resolve_checkpoint(path)
        except ConfigError as err:
            raise ConfigError(f"{setting}={path}: {err}") from err
    path = Path(path)
    pointer = path / "checkpoints" / FINAL
    if (path / "checkpoints").is_dir():
        if not pointer.exists():
            latest = path / "checkpoints" / LATEST
            at = f"its latest checkpoint is {latest.read_text().strip()}" if latest.exists() else "it has no checkpoint"
            raise ConfigError(f"{path} is a run that has not finished (no checkpoints/{FINAL}); {at}")
        path = pointer.parent / pointer.read_text().strip()
    _require_checkpoint(path)
    return path


def checkpoint_common_state(directory: str | Path) -> dict:
    """The plain values saved with a checkpoint (step, config, model config, fingerprints...)."""
    from megatron.core import dist_checkpointing

    directory = resolve_checkpoint(directory)
    return dist_checkpointing.load_common_state_dict(str(directory))


def load_model_weights(chunks: list, directory: str | Path) -> None:
    """Weights only, into any layout; optimizer and FP8 scaling state in the checkpoint are ignored.
    `directory` may be a run directory (its final checkpoint)."""
    directory = resolve_checkpoint(directory)
    _assign_model(chunks, _load(model_sharded_state_dict(chunks), directory), directory)


def weights_fingerprint(chunks: list) -> list[float]:
    """[sum, sum of squares] of every weight of the model, each counted once across tensor- and
    pipeline-parallel ranks (fp64): the same on every rank, and equal for equal weights in any
    layout up to rounding. Collective over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from phi4.model.build import unwrap

    total = torch.zeros(2, dtype=torch.float64)
    for chunk in chunks:
        for param in unwrap(chunk).parameters():
            if param_is_not_tensor_parallel_duplicate(param):
                p = param.detach().double()
                total += torch.stack([p.sum(), (p * p).sum()]).cpu()
    if torch.cuda.is_available():
        total = total.cuda()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.tolist()


# --- a training run's checkpoints ------------------------------------------------------------


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(data):
    """Each (pipeline, tensor) rank's RNG states; data-parallel replicas hold the same."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        data,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not (target / ".metadata").exists():
        raise ConfigError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


def _point(root: Path, name: str, directory: Path) -> None:
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(directory.name + "\n")
    os.replace(tmp, root / name)


def _publish(run_dir: Path, directory: Path, keep: int, final: bool = False) -> None:
    """Point `latest` (and for the run's last step `final`) at `directory` (atomically), then
    delete all but the newest `keep` (at least 1), never one that `latest` or `final` names."""
    root = Path(run_dir) / "checkpoints"
    _point(root, LATEST, directory)
    if final:
        _point(root, FINAL, directory)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if p.name <= directory.name]
    named = {(root / name).read_text().strip() for name in (LATEST, FINAL) if (root / name).exists()}
    for old in complete[: max(len(complete) - max(keep, 1), 0)]:
        if old.name not in named:  # what `latest` or `final` names is never removed
            shutil.rmtree(old, ignore_errors=True)


def _fault_point(directory: Path) -> None:
    """Fault injection for the crash tests: PHI4_FAULT=kill_before_publish:<step> SIGKILLs this
    process after the checkpoint's data is written but before `latest` names it."""
    fault = os.environ.get("PHI4_FAULT", "")
    if fault.startswith("kill_before_publish:") and directory.name == f"step_{int(fault.split(':')[1]):07d}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


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
    """Saves and restores a training run: model, optimizer, scheduler, RNG, data position, config."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool):
        self.run_dir, self.keep, self.async_save = Path(run_dir), keep, async_save
        self._queue = None

    def _state(self, chunks, optimizer, scheduler, extra: dict, is_loading: bool) -> dict:
        if is_loading:
            _materialize_optimizer_state(optimizer)
        state = model_sharded_state_dict(chunks, with_extra_state=True)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_METADATA)
        state["rng_state"] = _rng_sharded_object(None if is_loading else rng_state())
        state["scheduler"] = scheduler.state_dict()
        state.update(extra)
        return state

    def save(self, step: int, chunks, optimizer, scheduler, extra: dict, final: bool = False) -> Path:
        """Collective. `extra`: plain values (data position, config); `final`: the run's last
        checkpoint, which `checkpoints/final` will name. Returns the directory."""
        from megatron.core import dist_checkpointing

        directory = checkpoint_dir(self.run_dir, step)
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete earlier attempt at this step
            directory.mkdir(parents=True)
        torch.distributed.barrier()
        state = self._state(chunks, optimizer, scheduler, extra, is_loading=False)
        if not self.async_save:
            dist_checkpointing.save(state, str(directory))
            self._finish(directory, final)
            return directory
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.wait()
        # "mcore": Megatron-Core's own background writer ("nvrx" needs nvidia-resiliency-ext)
        request = dist_checkpointing.save(state, str(directory), async_sharded_save=True, async_strategy="mcore")
        request.add_finalize_fn(lambda: self._finish(directory, final))
        self._queue = self._queue or AsyncCallsQueue()
        self._queue.schedule_async_request(request)
        return directory

    def _finish(self, directory: Path, final: bool) -> None:
        torch.distributed.barrier()  # every rank's shards are on disk
        _fault_point(directory)
        if torch.distributed.get_rank() == 0:
            _publish(self.run_dir, directory, self.keep, final)
        torch.distributed.barrier()

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
        from megatron.core import dist_checkpointing

        _require_checkpoint(directory)
        common = dist_checkpointing.load_common_state_dict(str(directory))
        same_layout = common.get("layout") == layout
        state = self._state(chunks, optimizer, scheduler, {}, is_loading=True)
        state.pop("scheduler")
        if not same_layout:
            state.pop("rng_state")
        loaded = _load(state, directory)
        _assign_model(chunks, loaded, directory)
        _keep_restored_adam_step(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        return common
