"""Stop requests by signal, recorded from the moment a process starts.

SLURM's warning before a time limit (SIGUSR1, `--signal`) or a preemption (SIGTERM) may arrive
while a job is still importing torch or building its model; Python's default action for
SIGUSR1 would kill the process without a checkpoint. The entry points call `install()` before
anything slow, and the loops ask `received()` between steps (or problems).

A job of Hydra's submitit launcher is warned with submitit's own signal (USR2: its sbatch line
`--signal=USR2@<signal_delay_s>`, submitit/slurm/slurm.py `_make_sbatch_string`), and submitit
installs its handlers in the job after unpickling the task, so after ours
(submitit/core/submission.py `process_job`: `env._handle_signals(...)` before `delayed.result()`).
Its USR2 handler, `SignalHandler.checkpoint_and_try_requeue` (submitit/core/job_environment.py),
requeues the job and exits at once, mid-step, and its SIGTERM handler only logs: the run would
lose everything since its last periodic checkpoint. So the task calls `install()` again once it
runs: ours record SIGTERM, SIGUSR1 and submitit's signal, the run stops with a checkpoint like a
SLURM job's, and `requeue_by_launcher()` then hands over to submitit's handler, which requeues the
same call (the launcher's `checkpoint()`, hydra_submitit_launcher's BaseSubmititLauncher) within
its `max_num_timeout`; the requeued job resumes from run_dir's checkpoint.

`install()` also makes every process that multiprocessing starts from this one end with it,
kill -9 included: the checkpoint writer's Manager (~450 MB; forked on the CPU, spawned on GPUs,
where the spawned interpreter re-imports the entry module and so calls `install()` itself) and
its forked writer would otherwise live on as orphans.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.util
import signal
import sys
from typing import Callable, Optional

log = logging.getLogger("phi4.signals")

_received: Optional[str] = None
_launcher_handler: Optional[Callable] = None  # submitit's USR2 handler, replaced by ours in its jobs


def _record(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def _die_with_parent(_=None) -> None:
    """Linux's PR_SET_PDEATHSIG: SIGKILL this process when the one that started it ends
    (elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def end_children_with_this_process() -> None:
    """Every process multiprocessing forks from here ends with this one (spawned children: see
    `install()`)."""
    multiprocessing.util.register_after_fork(_die_with_parent, _die_with_parent)


def _submitit():
    """submitit's job-side module, when this process is a submitit job (it is imported there before
    any task code); else None. Never imported here: elsewhere submitit has no part."""
    return sys.modules.get("submitit.core.job_environment")


def _stop_signals() -> list[signal.Signals]:
    submitit = _submitit()
    launcher = [getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)] if submitit else []
    return [signal.SIGTERM, signal.SIGUSR1, *launcher]


def install() -> None:
    """Record SIGTERM/SIGUSR1 (and, in a submitit job, submitit's warning signal) in this process,
    unless it is a multiprocessing child: a spawned worker re-imports the entry module, and one that
    ignored SIGTERM would hang its pool's terminate() (the tokenizer pool of the corpus generation
    did). Children end with their parent. Called again in a submitit job, it takes the signals back
    from submitit's handlers, keeping its requeue for `requeue_by_launcher()`."""
    end_children_with_this_process()
    if multiprocessing.current_process().name != "MainProcess":
        # A spawned child re-importing the entry module (multiprocessing runs no after-fork hooks
        # in spawned processes): it ends with the process that spawned it.
        _die_with_parent()
        return
    global _launcher_handler
    submitit = _submitit()
    for sig in _stop_signals():
        previous = signal.signal(sig, _record)
        if submitit and isinstance(getattr(previous, "__self__", None), submitit.SignalHandler) \
                and previous.__name__ == "checkpoint_and_try_requeue":
            _launcher_handler = previous


def received() -> Optional[str]:
    """The name of the stop signal received so far, if any."""
    return _received


def requeue_by_launcher() -> None:
    """After a resumable stop (a checkpoint saved, exit 75) in a submitit launcher's job: submitit's
    own handler requeues the job to run the same call again (on global rank 0; on other ranks it
    only returns) and exits, as it would have done on its signal. When submitit will not requeue
    (its max_num_timeout used up) this says why in one line and returns: the job exits 75, and
    running the sweep again resumes it. Elsewhere nothing."""
    if _launcher_handler is None:
        return
    submitit = _submitit()
    try:
        _launcher_handler(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), None)
    except submitit.utils.UncompletedJobError as err:
        why = str(err).removeprefix("Job not requeued because: ").rstrip(".")
        log.warning(f"submitit did not requeue this job ({why}: hydra.launcher.max_num_timeout, the cluster file's "
                    f"sweep.max_requeues); exit 75: run the sweep again to resume from its checkpoint")
