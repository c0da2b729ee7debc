"""A private SLURM cluster for one test session: munged, slurmctld and slurmd from Debian's
packages, run as root with every file (slurm.conf, state, spool, logs, munge key and socket) under
one temporary directory and on two free ports, so a real installation on the same machine is never
touched. `tests/conftest.py` wraps it in the session fixtures `slurm_cluster` (one node: this
machine) and `two_node_cluster` (nodes n1 and n2, each a slurmd in a network namespace of its own:
tests/netns.py).

Finished jobs stay in slurmctld's memory for a day (MinJobAge), so `scontrol show job` answers
for them; there is no slurmdbd, and jobcomp/filetxt keeps a line per finished run as well.

Timing, as measured with Slurm 22.05 (Debian 12): slurmctld checks time limits and `--signal`
warnings every 30 s, counted from its own start, and sends the warning at the first check where
the job has at most sig_time + 30 s left; so with `--time=1 --signal=B:USR1@N` and N >= 30 the
signal comes at the first check after the job starts (0-30 s in), and the time limit itself is
enforced at the first check after it (0-30 s late). A requeued job waits cred_expire + 1 s
(AuthInfo below) before it may start again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from netns import Network

INSTALL_HINT = "run .ci/run, or apt-get install slurmctld slurmd slurm-client munge"
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
# Base states that a job never leaves (a requeued job shows PENDING or COMPLETING, not these).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY",
})
# The environment a test process may have inherited from a real SLURM job or user settings.
_FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SALLOC_|SRUN_|SQUEUE_|SINFO_|SCONTROL_|SACCT_|MUNGE_)")


def missing_reason() -> str | None:
    """Why the cluster cannot run here, as one line, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the private SLURM cluster runs slurmd as root: run the tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no file)"


def parse_scontrol_line(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: Key=Value pairs; a word without '=' belongs to the value
    before it (job names and commands may contain spaces)."""
    fields: dict[str, str] = {}
    key = None
    for word in line.split(" "):
        m = re.match(r"^([A-Za-z][\w:/]*)=(.*)$", word)
        if m:
            key = m.group(1)
            fields[key] = m.group(2)
        elif key is not None and word:
            fields[key] += " " + word
    return fields


@dataclass
class Job:
    """One job as `scontrol show job` sees it."""

    job_id: str
    state: str           # base state: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, ...
    restarts: int        # how often it was requeued
    exit_code: int       # the batch script's exit status (ExitCode=status:signal)
    exit_signal: int     # the signal that ended it, 0 if none
    stdout: Path | None
    fields: dict[str, str] = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        out = fields.get("StdOut")
        return cls(
            job_id=fields["JobId"],
            state=fields.get("JobState", "UNKNOWN"),
            restarts=int(fields.get("Restarts", "0")),
            exit_code=int(code or 0),
            exit_signal=int(sig or 0),
            stdout=Path(out) if out and out != "(null)" else None,
            fields=fields,
        )


class SlurmClusterError(RuntimeError):
    pass


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured from `root`.

    `env` is a complete environment for SLURM client commands (and, through sbatch's default
    --export=ALL, for the jobs): the caller's environment without inherited SLURM_* settings,
    plus SLURM_CONF pointing at this cluster's slurm.conf.
    """

    def __init__(self, root: Path, partition: str = "test", start_timeout: float = 30.0, nodes: int = 1):
        self.root = Path(root)
        self.partition = partition
        self.start_timeout = start_timeout
        self.host = socket.gethostname().split(".")[0]
        # One node is this machine itself; more are n1, n2, ... in network namespaces (start()).
        self.nodes = [self.host] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.node = self.nodes[0]
        self.network: Network | None = None
        self.addresses = {self.host: "127.0.0.1"} if nodes == 1 else {}
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.jobcomp = self.root / "jobcomp.txt"
        self.ctld_port, self.slurmd_port = self._two_ports()
        # AF_UNIX paths are limited to 107 bytes: fall back to a short private directory.
        munge_dir = self.root / "munge"
        self._short_dir = None
        if len(str(munge_dir / "munge.socket")) > 100:
            self._short_dir = Path(tempfile.mkdtemp(prefix="munge-"))
            munge_dir = self._short_dir
        self.munge_dir = munge_dir
        self.munge_socket = munge_dir / "munge.socket"
        self.cpus = os.cpu_count() or 1
        self._procs: dict[str, subprocess.Popen] = {}
        env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        self.env = env

    @staticmethod
    def _two_ports() -> tuple[int, int]:
        while True:
            a, b = _free_port(), _free_port()
            if a != b and {a, b}.isdisjoint({6817, 6818}):
                return a, b

    # ---------------------------------------------------------------- configuration
    def _node_lines(self) -> list[str]:
        """One NodeName line per node, with the hardware `slurmd -C` reports (every node is this
        machine), RealMemory 5% lower."""
        try:
            out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=20,
                                 env=self.env).stdout.splitlines()[0]
            hw = dict(w.split("=", 1) for w in out.split() if "=" in w)
            self.cpus = int(hw["CPUs"])
            memory = int(hw["RealMemory"])
            topology = " ".join(f"{k}={hw[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket",
                                                         "ThreadsPerCore") if k in hw)
        except (OSError, subprocess.SubprocessError, IndexError, KeyError, ValueError):
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
            topology = ""
        real_memory = max(1, min(memory - 256, int(memory * 0.95)))
        return [f"NodeName={node} NodeAddr={self.addresses[node]} CPUs={self.cpus} {topology} "
                f"RealMemory={real_memory} State=UNKNOWN" for node in self.nodes]

    @property
    def controller_address(self) -> str:
        return self.network.controller_address if self.network else "127.0.0.1"

    def write_conf(self, **overrides: str) -> None:
        r = self.root
        settings = {
            "ClusterName": "phi4test",
            "SlurmctldHost": f"{self.host}({self.controller_address})",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            # Everything runs as root: the daemons and the test jobs.
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "DisableRootJobs": "NO",
            # Our own munged; cred_expire also sets how long a requeued job waits to start
            # again (cred_expire + 1 s; the default 120 s would dominate every requeue test).
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=5",
            "StateSaveLocation": str(r / "state"),
            # Per node (%n): the nodes share this machine's file system.
            "SlurmdSpoolDir": str(r / "spool" / "%n"),
            "SlurmctldPidFile": str(r / "slurmctld.pid"),
            "SlurmdPidFile": str(r / "slurmd-%n.pid"),
            "SlurmctldLogFile": str(self.logs / "slurmctld.log"),
            "SlurmdLogFile": str(self.logs / "slurmd-%n.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "PlugStackConfig": str(r / "plugstack.conf"),   # empty: not /etc/slurm's SPANK plugins
            "MailProg": "/bin/true",
            "MpiDefault": "none",
            # No cgroups: a container may not delegate them. linuxproc tracks a job's processes
            # by parentage, which is enough for scripts that do not daemonize.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            # No slurmdbd: finished jobs are read from slurmctld (MinJobAge) or the jobcomp file.
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/filetxt",
            "JobCompLoc": str(self.jobcomp),
            "MinJobAge": "86400",
            # Cores are the unit: two 1-CPU jobs share a 2-CPU node; memory is not consumed.
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            # Schedule at once on submit and on every event, and re-test pending jobs every
            # second (a requeued job becomes eligible by the clock, with no event to wake it).
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=1,bf_interval=1,sched_min_interval=0,batch_sched_delay=0",
            # A job whose afterok dependency failed is cancelled, instead of pending forever
            # with Reason=DependencyNeverSatisfied.
            "DependencyParameters": "kill_invalid_depend",
            "JobRequeue": "1",
            "KillWait": "2",
            "ReturnToService": "2",   # a node marked DOWN comes back when slurmd registers
        }
        settings.update(overrides)
        lines = [f"{k}={v}" for k, v in settings.items() if v is not None]
        lines += self._node_lines()
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- lifecycle
    def start(self, **conf_overrides: str) -> SlurmCluster:
        spools = [self.root / "spool" / node for node in self.nodes]  # slurmd does not make its own
        for d in (self.root, self.root / "state", *spools, self.logs, self.munge_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o700)
        (self.root / "plugstack.conf").write_text("")
        try:
            if len(self.nodes) > 1:
                self.network = Network(self.nodes, self.root, controller=self.host).up()
                self.addresses = dict(self.network.addresses)
            self.write_conf(**conf_overrides)
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            for node in self.nodes:
                argv = ["slurmd", "-D", "-N", node]
                self._spawn(f"slurmd-{node}", self.network.wrap(node, argv) if self.network else argv)
            self._wait_idle()
        except BaseException as e:
            msg = f"the private SLURM cluster under {self.root} did not come up: {e}\n{self.log_tails()}"
            self.stop()
            raise SlurmClusterError(msg) from None
        return self

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged refuses socket directories that are not world-searchable (ours sits
        # under pytest's 0700 tmp directory) and only needs to serve root here.
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={self.logs / 'munged.log'}", f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ])
        self._poll(lambda: subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                          capture_output=True).returncode == 0, "munged to answer")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.logs / f"{name}.stderr", "wb")
        self._procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        out.close()

    def _poll(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with status {p.returncode} while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {self.start_timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            r = self.run(["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %T"], timeout=10)
            return r.returncode == 0 and sorted(r.stdout.split()) == sorted(
                [*self.nodes, *["idle"] * len(self.nodes)])

        self._poll(lambda: self.run(["scontrol", "ping"], timeout=10).returncode == 0, "slurmctld (scontrol ping)")
        self._poll(idle, f"node(s) {','.join(self.nodes)} to be idle in partition {self.partition}")

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons, then end any process left from this
        cluster's jobs (found by the SLURM_CONF in its environment)."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            try:
                live = [j.job_id for j in self.jobs() if not j.finished]
                if live:
                    self.run(["scancel", *live], timeout=10)
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and any(not j.finished for j in self.jobs()):
                        time.sleep(0.2)
            except (SlurmClusterError, subprocess.SubprocessError):
                pass  # slurmctld does not answer: stop it anyway
        for name in (*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"):
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.network is not None:
            self.network.down()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def log_tails(self, lines: int = 25) -> str:
        """The daemons' logs; munged logs to stderr in the foreground, and slurmctld/slurmd
        repeat their log there, with the fatal errors from before the log file opened."""
        parts = []
        slurmd = [(f"slurmd-{node}{ext}", n) for node in self.nodes for ext, n in ((".log", lines), (".stderr", 5))]
        for name, n in (("munged.stderr", lines), ("slurmctld.log", lines), ("slurmctld.stderr", 5), *slurmd):
            path = self.logs / name
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path} (last {n} lines)\n{_tail(path, n)}")
        return "\n".join(parts) or f"(no daemon logs under {self.logs})"

    # ---------------------------------------------------------------- client side
    def run(self, args: list[str], timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        kw.setdefault("cwd", self.root)
        return subprocess.run([str(a) for a in args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    def submit(self, script: str | os.PathLike | list[str], *sbatch_args: str, cwd: str | os.PathLike | None = None) -> str:
        """sbatch a job; return its id. `script` is a script file, the text of a script (starting
        with "#!"), or a list of raw sbatch arguments. Output goes to <root>/job-<id>.out unless
        the arguments name one."""
        if isinstance(script, list):
            tail = [str(a) for a in script]
        else:
            text = str(script)
            if text.startswith("#!"):
                fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                text = name
            tail = [text]
        args = [str(a) for a in sbatch_args]
        if not any(a in ("-o", "--output") or a.startswith("--output=") for a in args + tail):
            args.append(f"--output={self.root / 'job-%j.out'}")
        r = self.run(["sbatch", "--parsable", *args, *tail], cwd=cwd or self.root)
        if r.returncode != 0:
            raise SlurmClusterError(f"sbatch {' '.join(args + tail)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def query(self, args: list[str], attempts: int = 3, timeout: float = 15) -> subprocess.CompletedProcess:
        """A read-only client command (scontrol show ...), tried again when it fails for a
        moment: under a full suite's load a client has been seen to exit nonzero with nothing on
        stderr while munged timed out reading its request. A failure that stays raises with
        every attempt's exit status and output, and the daemons' logs."""
        tries = []
        for attempt in range(attempts):
            try:
                r = self.run(args, timeout=timeout)
            except subprocess.TimeoutExpired:
                tries.append(f"attempt {attempt + 1}: no answer in {timeout:.0f} s")
            else:
                if r.returncode == 0:
                    return r
                if "Invalid job id" in r.stderr:     # a real answer, not a transient failure
                    return r
                tries.append(f"attempt {attempt + 1}: exit {r.returncode}, "
                             f"stderr {r.stderr.strip()!r}, stdout {r.stdout.strip()[:200]!r}")
            time.sleep(1 + attempt)
        raise SlurmClusterError(f"{' '.join(map(str, args))} failed {attempts} times:\n"
                                + "\n".join(tries) + f"\n{self.log_tails(10)}")

    def jobs(self) -> list[Job]:
        """Every job slurmctld knows, finished ones included (for MinJobAge = a day)."""
        r = self.query(["scontrol", "show", "job", "-o"])
        return [Job.from_fields(parse_scontrol_line(line)) for line in r.stdout.splitlines()
                if line.startswith("JobId=")]

    def job(self, job_id: str | int) -> Job:
        r = self.query(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode != 0 or not r.stdout.startswith("JobId="):
            raise SlurmClusterError(f"scontrol show job {job_id}: {r.stderr.strip() or r.stdout.strip()}")
        return Job.from_fields(parse_scontrol_line(r.stdout.splitlines()[0]))

    def output(self, job_id: str | int) -> str:
        path = self.job(job_id).stdout
        return path.read_text() if path and path.exists() else ""

    def wait(self, job_ids, timeout: float = 60, poll: float = 0.2) -> dict[str, str]:
        """Poll until every job has really ended (a requeued job is PENDING again, not ended);
        return job id -> final state (COMPLETED, FAILED, TIMEOUT, CANCELLED, ...)."""
        ids = [str(job_ids)] if isinstance(job_ids, (str, int)) else [str(j) for j in job_ids]
        deadline = time.monotonic() + timeout
        while True:
            known = {j.job_id: j for j in self.jobs()}
            states = {i: known[i].state if i in known else "UNKNOWN" for i in ids}
            if all(s in FINAL_STATES for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished after {timeout:.0f} s: {states}\n{self.log_tails(10)}")
            time.sleep(poll)
