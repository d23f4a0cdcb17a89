"""A real single-node Slurm cluster on localhost, for tests.

`SlurmCluster` writes a slurm.conf into a temporary folder (state, spool, pid and log files all
live there), starts `slurmctld` and `slurmd` in the foreground as child processes, waits until
`sinfo` reports the node idle, and on `stop()` cancels the jobs still queued and terminates
exactly the two daemons it started (by pid). Clients reach it through `cluster.env`
(`SLURM_CONF` points at the generated config).

The pytest fixture `slurm_cluster` (session scope) skips with a message naming the missing
binaries or the failed start. Import it into a test module with
`from slurm_cluster import slurm_cluster`. Starting the daemons needs root (SlurmUser=root,
AuthType=auth/none); `tests/install_slurm.sh` installs the Debian packages.

Run by hand: `python tests/slurm_cluster.py` starts a cluster, prints the environment to use,
and stops it on Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel")
NODE_NAME = "localhost"
PARTITION = "debug"
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)


def missing_binaries() -> list[str]:
    """Names of the Slurm daemons and clients that are not on PATH (or in /usr/sbin)."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _binary(name: str) -> str:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=search)
    if found is None:
        raise FileNotFoundError(f"Slurm binary {name!r} is not installed (run tests/install_slurm.sh)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node_hardware() -> str:
    """The node's CPU topology and memory as `slurmd -C` detects them (without NodeName)."""
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    fields = dict(item.split("=", 1) for item in first if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    memory_mb = max(256, int(fields.get("RealMemory", "1024")) // 2)
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + f" RealMemory={memory_mb}"


def render_config(root: Path, ctld_port: int, slurmd_port: int, hardware: str) -> str:
    """slurm.conf text for a one-node cluster whose files all live under `root`."""
    return "\n".join(
        [
            "ClusterName=distdettest",
            f"SlurmctldHost={NODE_NAME}",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            # A requeued job waits `cred_expire` (default 120 s) and then for the next scheduler
            # pass (default every 60 s); both shortened so requeue tests take seconds.
            "AuthInfo=cred_expire=5",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
            f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class SlurmCluster:
    """A one-node Slurm cluster on localhost whose daemons are children of this process."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="distdet-slurm-")) if root is None else Path(root)
        self.conf = self.root / "slurm.conf"
        self.env: dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: dict[str, subprocess.Popen] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Write the config, start both daemons, and return once the node is idle.

        Raises RuntimeError (with the tail of the daemon logs) when the node does not come up.
        """
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(render_config(self.root, ctld_port, slurmd_port, _node_hardware()))
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", NODE_NAME])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs()}")
            result = self.run(["sinfo", "-h", "-n", NODE_NAME, "-o", "%t"], check=False)
            state = result.stdout.strip()
            if result.returncode == 0 and state == "idle":
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"node {NODE_NAME} not idle after {timeout:.0f}s (state {state!r})\n{self.logs()}")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        try:
            self._daemons[name] = subprocess.Popen(
                list(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel this cluster's remaining jobs, then stop exactly the daemons started here."""
        if self._daemons.get("slurmctld") is not None and self._daemons["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.3)
        for name in ("slurmd", "slurmctld"):
            proc = self._daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        """Stop the daemons and delete the temporary folder (if this object created it)."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def pids(self) -> dict[str, int]:
        """Pids of the daemons this object started (and that still run)."""
        return {name: p.pid for name, p in self._daemons.items() if p.poll() is None}

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client (or anything) against this cluster and capture its text output."""
        result = subprocess.run(
            list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=cwd
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited with {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def job_field(self, job_id: int | str, field: str) -> str:
        """One field (e.g. 'JobState', 'Restarts', 'ExitCode') of `scontrol show job`."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        for item in out.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        raise KeyError(f"field {field!r} not in scontrol output for job {job_id}: {out}")

    def wait_for_job(self, job_id: int | str, timeout: float = 300.0) -> tuple[str, str]:
        """Poll until the job reaches a final state (a requeued job is followed through its
        restarts); return (JobState, ExitCode). Faster than `sbatch --wait`, which polls
        every 2, 4, 8 ... seconds. Raises TimeoutError with the job's state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in FINAL_STATES:
                return state, self.job_field(job_id, "ExitCode")
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s")

    def logs(self, lines: int = 30) -> str:
        """The tail of each daemon's log, for error messages."""
        parts = []
        for name in DAEMONS:
            for suffix in (".log", ".stdout"):
                path = self.root / f"{name}{suffix}"
                if path.exists():
                    text = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster for the whole test session (skips when unavailable)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            "Slurm is not installed (missing: " + ", ".join(missing) + "); run tests/install_slurm.sh as root"
        )
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    cluster = SlurmCluster()
    try:
        cluster.start()  # installed but failing to start is an error, not a skip
        yield cluster
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    with SlurmCluster() as running:
        print(f"Slurm cluster up (pids {running.pids}); in another shell:\n  export SLURM_CONF={running.conf}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
