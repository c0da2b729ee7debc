"""Loss spikes: a step whose loss is above the mean of the last `train.spike_window` steps by more
than `train.spike_sigmas` standard deviations (or not finite) is not applied. The Trainer then,
per `train.spike_action`, skips that batch (`skip`), or goes back to the last checkpoint and skips
the data from there to the end of the offending batch (`rewind`, the remedy of PaLM and OPT).

Every rank decides alike: the loss (on the last pipeline stage, already averaged over the
data-parallel ranks) is broadcast over the pipeline first. The window of recent losses is part of
the run's TrainState, saved in every checkpoint, so a resumed run makes the same choice.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import torch
from megatron.core import parallel_state

from phi4.checkpoint.pointers import latest_checkpoint
from phi4.runtime import device


def agreed_loss(loss: Optional[float]) -> float:
    """The last pipeline stage's loss on every rank."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return float(loss)
    value = device.current().put(torch.tensor([math.nan if loss is None else loss], dtype=torch.float64))
    torch.distributed.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return value.item()


class SpikeGuard:
    """The gate the objectives' step asks before the optimizer's update (phi4.train.step)."""

    def __init__(self, sigmas: float, window: int, state):
        self.sigmas, self.window, self.state = sigmas, window, state  # the window is state.recent_losses

    def __call__(self, loss: Optional[float]) -> Optional[str]:
        """Why this step's update must not be applied, or None (then its loss joins the window)."""
        loss = agreed_loss(loss)
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        recent = self.state.recent_losses
        if len(recent) >= self.window:
            mean, spread = statistics.fmean(recent), statistics.pstdev(recent)
            if spread > 0 and loss > mean + self.sigmas * spread:
                return (f"the loss {loss:.4f} is {(loss - mean) / spread:.1f} standard deviations above the last "
                        f"{len(recent)} steps' mean {mean:.4f} (train.spike_sigmas={self.sigmas:g})")
        recent.append(loss)
        del recent[:-self.window]
        return None


ACTIONS = ("skip", "rewind")


def respond(trainer, result: dict, first_sample: int) -> bool:
    """After a vetoed step: log it, and with train.spike_action=rewind go back to the last
    checkpoint and past the offending batch. Returns True when the run went back (the step is undone)."""
    state, end = trainer.state, trainer.batches.consumed
    action = trainer.settings.spike_action
    target = None
    if action == "rewind":
        trainer.checkpointer.wait()
        target = latest_checkpoint(trainer.run_dir)
    if target is None:
        state.skipped_windows.append([first_sample, end])
        trainer.log_info(f"step {state.step}: update skipped: {result['spike']}; samples {first_sample}-{end - 1} "
                         f"not trained on{' (no checkpoint yet to go back to)' if action == 'rewind' else ''}")
        return False
    spiked_at = state.step
    saved = trainer.checkpointer.load(target, trainer.ddp, trainer.optimizer, trainer.scheduler, trainer.layout)
    state.load_state_dict(saved)
    state.skipped_windows.append([state.consumed_samples, end])
    trainer.log_info(f"step {spiked_at}: {result['spike']}; back to {target.name} (step {state.step}), "
                     f"skipping samples {state.consumed_samples}-{end - 1}")
    state.consumed_samples = trainer.batches.consumed = end
    return True
