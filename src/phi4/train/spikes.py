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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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

    def __init__(self, sigmas: float, window: int, state,
                 agree: Callable[[Optional[float]], float] = agreed_loss):
        # the window is state.recent_losses (read at each call: loading a checkpoint replaces it);
        # `agree` makes the loss every rank's (the pipeline's broadcast)
        self.sigmas, self.window, self.state, self.agree = sigmas, window, state, agree

    def __call__(self, loss: Optional[float]) -> Optional[str]:
        """Why this step's update must not be applied, or None (then its loss joins the window)."""
        loss = self.agree(loss)
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


@dataclass(frozen=True)
class Rewound:
    """A spiked step undone: the run went back to `checkpoint` (step `back_to`) and skips samples
    [first_skipped, resume_at) of the data; `Trainer.step` returns it instead of a StepResult."""

    spiked_at: int
    checkpoint: Path
    back_to: int
    first_skipped: int
    resume_at: int


def respond(action: str, why: str, state, first_sample: int, end: int, checkpointer,
            log_info: Callable[[str], None]) -> Optional[Rewound]:
    """After a vetoed step over samples [first_sample, end): log it, and with
    train.spike_action=rewind restore every part from the last checkpoint (`checkpointer.load`,
    the TrainState included) and record the samples skipped from there to `end`. Returns the
    Rewound, or None when the batch was only skipped; the caller moves its batches to `end`."""
    target = None
    if action == "rewind":
        checkpointer.wait()
        target = latest_checkpoint(checkpointer.run_dir)
    if target is None:
        state.skipped_windows.append([first_sample, end])
        log_info(f"step {state.step}: update skipped: {why}; samples {first_sample}-{end - 1} not trained on"
                 f"{' (no checkpoint yet to go back to)' if action == 'rewind' else ''}")
        return None
    spiked_at = state.step
    checkpointer.load(target)
    rewound = Rewound(spiked_at, target, state.step, state.consumed_samples, end)
    state.skipped_windows.append([state.consumed_samples, end])
    log_info(f"step {spiked_at}: {why}; back to {target.name} (step {state.step}), skipping samples "
             f"{state.consumed_samples}-{end - 1}")
    state.consumed_samples = end
    return rewound
