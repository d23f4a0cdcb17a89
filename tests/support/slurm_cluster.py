"""A real single-node Slurm cluster on localhost, for tests.

`SlurmCluster` writes a slurm.conf into a temporary folder (state, spool, pid and log files all
live there), starts `slurmctld` and `slurmd` in the foreground as child processes, waits until
`sinfo` reports the node idle, and on `stop()` cancels the jobs still queued and terminates
exactly the daemons it started (by pid). Clients reach it through `cluster.env`
(`SLURM_CONF` points at the generated config).

The pytest fixture `slurm_cluster` (session scope) skips with a message naming the missing
binaries or the failed start. Import it into a test module with
`from support.slurm_cluster import slurm_cluster`. Starting the daemons needs root (SlurmUser=root,
AuthType=auth/none); `tests/install_slurm.sh` installs the Debian packages.

`SlurmCluster(nodes=2)` (fixture `slurm_cluster_2nodes`) runs each slurmd in its own network
namespace joined by a bridge, a real 2-node cluster on one machine.

Run by hand: `python tests/support/slurm_cluster.py [NODES]` starts a cluster, prints the environment
to use, and stops it on Ctrl-C.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Node:
    """One slurmd: its node name, the address Slurm reaches it at, its network namespace."""

    name: str
    addr: str
    netns: str | None = None


def render_config(root: Path, ctld_port: int, slurmd_port: int, hardware: str, nodes: Sequence[Node],
                  ctld_addr: str | None = None) -> str:
    """slurm.conf text for a cluster whose files all live under `root` (per-node paths use %n)."""
    controller = "localhost" if ctld_addr is None else f"localhost({ctld_addr})"
    return "\n".join(
        [
            "ClusterName=distdettest",
            f"SlurmctldHost={controller}",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd-%n.log'}",
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
            *(f"NodeName={n.name} NodeAddr={n.addr} {hardware} State=UNKNOWN" for n in nodes),
            f"PartitionName={PARTITION} Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class NetworkUnavailable(RuntimeError):
    """Network namespaces, veth pairs or bridges cannot be created here."""


class _Network:
    """A bridge with one veth pair per node namespace: nodes reach each other and the
    controller (on the bridge's address) over TCP, like separate machines."""

    def __init__(self, count: int) -> None:
        taken = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        subnet = next(n for n in random.sample(range(1, 250), 249) if f"ddbr{n}:" not in taken)
        self.prefix = f"10.77.{subnet}"
        self.bridge = f"ddbr{subnet}"
        self.controller_addr = f"{self.prefix}.1"
        self.nodes = [Node(f"n{i}", f"{self.prefix}.{10 + i}", f"distdet-{subnet}-n{i}") for i in range(1, count + 1)]
        self._host_ends = [f"ddh{subnet}n{i}" for i in range(1, count + 1)]
        self._created: list[tuple[str, str]] = []

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetworkUnavailable(f"{' '.join(argv)} failed: {result.stderr.strip()}")

    def create(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for node, host_end in zip(self.nodes, self._host_ends):
            peer = host_end.replace("ddh", "ddp")
            self._ip("netns", "add", node.netns)
            self._created.append(("netns", node.netns))
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", peer)
            self._created.append(("link", host_end))
            self._ip("link", "set", peer, "netns", node.netns)
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("addr", "add", f"{node.addr}/24", "dev", peer, netns=node.netns)
            self._ip("link", "set", peer, "up", netns=node.netns)
            self._ip("link", "set", "lo", "up", netns=node.netns)

    def remove(self) -> None:
        """Delete exactly what create() made, newest first."""
        for kind, name in reversed(self._created):
            argv = ["ip", "link", "del", name] if kind == "link" else ["ip", "netns", "del", name]
            subprocess.run(argv, capture_output=True)
        self._created.clear()


class SlurmCluster:
    """A Slurm cluster on this machine whose daemons are children of this process.

    `nodes=1`: one node, `localhost`, on 127.0.0.1. `nodes=N>1`: N nodes `n1..nN`, each slurmd in
    its own network namespace joined by a bridge (needs root and iproute2), so that the nodes
    talk over TCP as separate machines do; they share this machine's CPUs and filesystem.
    """

    def __init__(self, root: Path | None = None, *, nodes: int = 1) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="distdet-slurm-")) if root is None else Path(root)
        self.conf = self.root / "slurm.conf"
        self.env: dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: dict[str, subprocess.Popen] = {}
        self._network = _Network(nodes) if nodes > 1 else None
        self.nodes = self._network.nodes if self._network else [Node(NODE_NAME, "127.0.0.1")]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Write the config, start the daemons, and return once every node is idle.

        Raises RuntimeError (with the tail of the daemon logs) when a node does not come up.
        """
        for sub in ["state", *(f"spool/{n.name}" for n in self.nodes)]:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_addr = None
        if self._network is not None:
            try:
                self._network.create()
            except NetworkUnavailable:
                self._network.remove()
                raise
            ctld_addr = self._network.controller_addr
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(render_config(self.root, ctld_port, slurmd_port, _node_hardware(), self.nodes, ctld_addr))
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            slurmd = [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", node.name]
            # nsenter enters only the network namespace (`ip netns exec` would also remount /sys,
            # hiding /sys/fs/cgroup from slurmd) and execs slurmd, so the pid is slurmd's own.
            if node.netns:
                slurmd = [_binary("nsenter"), f"--net=/var/run/netns/{node.netns}", *slurmd]
            self._spawn(f"slurmd-{node.name}", slurmd)
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    logs = self.logs()
                    self.stop()
                    raise RuntimeError(f"{name} exited with status {proc.returncode}\n{logs}")
            result = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
            if result.returncode == 0 and all(states.get(n.name) == "idle" for n in self.nodes):
                return self
            time.sleep(0.2)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"nodes not idle after {timeout:.0f}s (states {states})\n{logs}")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        try:
            self._daemons[name] = subprocess.Popen(
                list(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel this cluster's remaining jobs, stop exactly the daemons started here, and
        remove the network namespaces this object created."""
        if self._daemons.get("slurmctld") is not None and self._daemons["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.3)
        for name in sorted(self._daemons, key=lambda n: n == "slurmctld"):  # slurmd first
            proc = self._daemons.pop(name)
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._network is not None:
            self._network.remove()

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
        for path in sorted(self.root.glob("slurm*.log")) + sorted(self.root.glob("slurm*.stdout")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)


def _skip_without_slurm() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(
            "Slurm is not installed (missing: " + ", ".join(missing) + "); run tests/install_slurm.sh as root"
        )
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster for the whole test session (skips when Slurm is not
    installed; a cluster that is installed but does not start is an error)."""
    _skip_without_slurm()
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def slurm_cluster_2nodes() -> Iterator[SlurmCluster]:
    """A running two-node cluster, each slurmd in its own network namespace (skips when Slurm
    is not installed or network namespaces cannot be made here)."""
    _skip_without_slurm()
    if shutil.which("ip") is None and not Path("/usr/sbin/ip").exists():
        pytest.skip("iproute2's `ip` is not installed: no network namespaces for a 2-node cluster")
    cluster = SlurmCluster(nodes=2)
    try:
        try:
            cluster.start()
        except NetworkUnavailable as err:
            pytest.skip(f"cannot build a 2-node network here: {err}")
        yield cluster
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    import sys

    with SlurmCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1) as running:
        print(f"Slurm cluster up (pids {running.pids}); in another shell:\n  export SLURM_CONF={running.conf}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
