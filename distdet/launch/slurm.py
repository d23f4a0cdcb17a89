"""The ``accelerate launch`` command one node of a Slurm job runs — built in this one place.

Both sbatch scripts in ``launch/slurm/`` start one task per node (``srun --ntasks-per-node=1``)
running ``python -m distdet.launch.slurm [options] TRAIN_SCRIPT [TRAIN_ARGS...]``. From the job's
environment this module derives:

* the node list (``SLURM_JOB_NODELIST``, expanded with ``scontrol show hostnames`` when that
  works, otherwise with :func:`expand_hostlist`), hence the number of machines and the main
  process address (the first node; its ``NodeAddr`` when ``scontrol show node`` knows it);
* this node's machine rank (``SLURM_NODEID``);
* the main process port, ``29500 + SLURM_JOB_ID % 1000`` — the same on every node and after a
  requeue, different for most jobs sharing a node;
* processes per node: the GPUs Slurm gave this node (``SLURM_GPUS_ON_NODE``, else
  ``SLURM_GPUS_PER_NODE``, else ``CUDA_VISIBLE_DEVICES``, else what torch sees), or, with no
  GPU or with ``--cpu-procs N``, N CPU processes over gloo (N defaults to 1).

It then runs ``python -m accelerate.commands.launch`` with a config from ``launch/accelerate/``
(mixed precision comes from there unless ``--mixed-precision`` overrides it) and explicit
topology flags, which take precedence over the config's. Measured with accelerate 1.15 on a
machine without GPUs: only the multi-GPU launcher starts several CPU processes that form a real
gloo group, and only when ``ACCELERATE_USE_CPU=true`` is in the workers' environment (or the
script builds ``Accelerator(cpu=True)``); ``--cpu --num_processes 2``, ``distributed_type:
MULTI_CPU`` and ``use_cpu: true`` in a MULTI_GPU config each silently give single-process
workers. So CPU jobs with more than one process use the multi-GPU launcher plus that variable.

On several machines, ``GLOO_SOCKET_IFNAME`` (unless set) names the interface that leads to the
main node, because gloo's default (the address of this machine's host name) is often a
loopback address. Torch/Slurm variables inherited from the job (``RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` ...) are removed before launching; Accelerate's launcher
sets its own. Slurm's ``SLURM_NTASKS_PER_NODE`` is never used (it is empty unless
``--ntasks-per-node`` was given).

Signals: the launcher process (which becomes torch's elastic agent) ignores SIGUSR1, so Slurm's
``--signal=USR1@SECONDS`` warning, which reaches every process of the step, is handled by the
training processes (which install their own handler) instead of killing the agent. The workers
inherit "ignore" until they install that handler.

``--dry-run`` prints, instead of running, each node's command (``--all-nodes``: every node of
the job, one line each) as ``node RANK (HOST): VAR=VALUE ... COMMAND``.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from distdet.runtime.options import MIXED_PRECISION_CHOICES

#: The Accelerate config files shipped inside the package (``launch/accelerate/`` of a checkout
#: links to them), so an installed distdet launches without a checkout beside it.
CONFIG_DIR = Path(__file__).resolve().parent / "accelerate"
BASE_PORT = 29500
PORT_SPREAD = 1000
_SIOCGIFADDR = 0x8915
#: Launcher variables a job may inherit that must not reach Accelerate's launcher.
INHERITED_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


class SlurmPlanError(ValueError):
    """The job's environment or the options do not describe a launchable job (no Accelerator
    involved: :class:`distdet.runtime.accelerator.LaunchError` is the Accelerator's refusal)."""


# -- node lists ------------------------------------------------------------------------------
def _split_top_level(expr: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmPlanError(f"node list {expr!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmPlanError(f"node list {expr!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmPlanError(f"node list {expr!r}: unclosed '['")
    parts.append(expr[start:])
    return parts


def _expand_range_body(body: str, expr: str) -> list[str]:
    values = []
    for piece in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if match is None:
            raise SlurmPlanError(f"node list {expr!r}: bad range {piece!r} in [{body}]")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise SlurmPlanError(f"node list {expr!r}: range {piece!r} runs backwards")
        width = len(low)  # Slurm pads every number to the width of the range's start
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def _expand_item(item: str, expr: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_item(rest, expr)
    return [prefix + value + tail for value in _expand_range_body(body, expr) for tail in tails]


def expand_hostlist(expr: str) -> list[str]:
    """Expand Slurm's compressed node-list syntax, e.g. ``"a[1-3,5],b7"`` ->
    ``["a1", "a2", "a3", "a5", "b7"]``; zero padding follows the range start (``n[08-10]``).
    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]``)."""
    expr = expr.strip()
    if not expr:
        raise SlurmPlanError("empty node list")
    hosts = []
    for item in _split_top_level(expr):
        if not item:
            raise SlurmPlanError(f"node list {expr!r}: empty entry")
        hosts.extend(_expand_item(item, expr))
    return hosts


def _scontrol(args: Sequence[str], env: Mapping[str, str]) -> str | None:
    exe = shutil.which("scontrol", path=env.get("PATH"))
    if exe is None:
        return None
    try:
        result = subprocess.run(
            [exe, *args], env=dict(env), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def job_hostnames(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The job's hosts in Slurm's order: ``scontrol show hostnames`` when it works (it needs a
    Slurm configuration), otherwise :func:`expand_hostlist`."""
    env = os.environ if env is None else env
    out = _scontrol(["show", "hostnames", nodelist], env)
    if out is not None and out.split():
        return out.split()
    return expand_hostlist(nodelist)


def node_address(host: str, env: Mapping[str, str] | None = None) -> str:
    """The address other nodes reach ``host`` at: its ``NodeAddr`` in ``scontrol show node``
    when Slurm knows the node, else the host name itself."""
    env = os.environ if env is None else env
    out = _scontrol(["show", "node", "-o", host], env)
    if out:
        match = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
        if match and match.group(1) not in ("", "(null)"):
            return match.group(1)
    return host


def _interface_ipv4(sock: socket.socket, name: str) -> str | None:
    try:
        packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


def route_interface(address: str) -> str | None:
    """Name of the local network interface that traffic to ``address`` leaves by (Linux), or
    None when it cannot be told or is the loopback. Gloo otherwise binds to the address this
    machine's host name resolves to, which is often 127.0.x.1 in /etc/hosts: the other nodes
    then cannot connect (measured on a 2-node test cluster)."""
    try:
        target = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
            if local.startswith("127."):
                return None
            for _, name in socket.if_nameindex():
                if _interface_ipv4(probe, name) == local:
                    return name
    except OSError:
        return None
    return None


# -- plan ------------------------------------------------------------------------------------
def port_for_job(job_id: str | int) -> int:
    """Main process port for a job: ``29500 + job_id % 1000`` (stable across a requeue)."""
    try:
        number = int(str(job_id).split("_")[0])
    except ValueError as err:
        raise SlurmPlanError(f"SLURM_JOB_ID {job_id!r} is not a number") from err
    return BASE_PORT + number % PORT_SPREAD


def _count_gres(spec: str) -> int:
    """GPUs in a Slurm GPU count such as ``4``, ``a100:4`` or ``a100:2,v100:1``."""
    total = 0
    for entry in spec.split(","):
        last = entry.strip().split(":")[-1]
        match = re.match(r"\d+", last)
        if match is None:
            raise SlurmPlanError(f"cannot read a GPU count from {spec!r}")
        total += int(match.group(0))
    return total


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs this node may use, from Slurm's variables, else ``CUDA_VISIBLE_DEVICES``, else torch."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(var, "").strip()
        if value:
            return _count_gres(value)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "NoDevFiles"])
    import torch  # only when Slurm did not say: a node without GPU gres

    return torch.cuda.device_count()


@dataclass(frozen=True)
class NodeLaunch:
    """What one node of the job launches."""

    hostnames: tuple[str, ...]
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    processes_per_node: int
    use_cpu: bool
    threads_per_process: int | None

    @property
    def num_machines(self) -> int:
        return len(self.hostnames)

    @property
    def num_processes(self) -> int:
        """Processes in the whole job (every node runs the same number)."""
        return self.num_machines * self.processes_per_node

    @property
    def config_name(self) -> str:
        """The file in ``launch/accelerate/`` this node's launch starts from."""
        if self.use_cpu:
            return "cpu_2proc.yaml"
        if self.num_machines > 1:
            return "multi_node.yaml"
        return "single_gpu.yaml" if self.processes_per_node == 1 else "multi_gpu.yaml"


def _positive_int(value: str | int, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise SlurmPlanError(f"{what} must be a whole number, got {value!r}") from err
    if number < 1:
        raise SlurmPlanError(f"{what} must be at least 1, got {number}")
    return number


def plan_node(
    env: Mapping[str, str],
    *,
    machine_rank: int | None = None,
    cpu_procs: int | None = None,
    gpus_per_node: int | None = None,
    main_addr: str | None = None,
    main_port: int | None = None,
) -> NodeLaunch:
    """Derive one node's launch from a Slurm job environment (see the module docstring).

    ``cpu_procs`` forces CPU processes; ``gpus_per_node`` overrides GPU detection (0 = CPU).
    Raises SlurmPlanError naming the variable when the environment is not a Slurm job's.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmPlanError("SLURM_JOB_NODELIST is not set: run inside a Slurm job (sbatch/srun)")
    hosts = tuple(job_hostnames(nodelist, env))
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes and int(nnodes) != len(hosts):
        raise SlurmPlanError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
    if machine_rank is None:
        node_id = env.get("SLURM_NODEID", "").strip()
        if not node_id:
            raise SlurmPlanError("SLURM_NODEID is not set: run one task per node with srun")
        machine_rank = int(node_id)
    if not 0 <= machine_rank < len(hosts):
        raise SlurmPlanError(f"machine rank {machine_rank} outside 0..{len(hosts) - 1} for nodes {list(hosts)}")
    if main_port is None:
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise SlurmPlanError("SLURM_JOB_ID is not set and no main port was given")
        main_port = port_for_job(job_id)
    address = main_addr or node_address(hosts[0], env)

    if cpu_procs is not None:
        use_cpu, per_node = True, _positive_int(cpu_procs, "CPU processes per node")
    else:
        gpus = gpus_on_node(env) if gpus_per_node is None else int(gpus_per_node)
        use_cpu, per_node = (True, 1) if gpus == 0 else (False, gpus)
    threads = None
    if use_cpu:
        cpus = env.get("SLURM_CPUS_ON_NODE", "").strip()
        cpus_here = int(cpus) if cpus else (os.cpu_count() or 1)
        threads = max(1, cpus_here // per_node)
    return NodeLaunch(hosts, machine_rank, address, int(main_port), per_node, use_cpu, threads)


# -- command ---------------------------------------------------------------------------------
def accelerate_command(
    plan: NodeLaunch,
    train_script: str,
    train_args: Sequence[str] = (),
    *,
    python: str = sys.executable,
    config_dir: Path = CONFIG_DIR,
    mixed_precision: str | None = None,
) -> list[str]:
    """The ``accelerate launch`` argv for ``plan``'s node."""
    config = Path(config_dir) / plan.config_name
    if not config.is_file():
        raise SlurmPlanError(f"Accelerate config {config} does not exist")
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if plan.use_cpu and plan.num_processes == 1:
        cmd.append("--cpu")  # the simple launcher; the config's MULTI_GPU needs >= 2 processes
    cmd += ["--num_processes", str(plan.num_processes), "--num_machines", str(plan.num_machines)]
    if plan.num_processes > 1:
        cmd += ["--machine_rank", str(plan.machine_rank)]
        cmd += ["--main_process_ip", plan.main_process_ip, "--main_process_port", str(plan.main_process_port)]
    if plan.num_machines > 1:
        cmd += ["--same_network", "--rdzv_backend", "static"]
    if plan.use_cpu:
        cmd += ["--num_cpu_threads_per_process", str(plan.threads_per_process)]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    return cmd + [train_script, *train_args]


def launch_environment(plan: NodeLaunch, base: Mapping[str, str], gloo_ifname: str | None = None) -> dict[str, str]:
    """``base`` without inherited launcher variables, plus what a CPU launch needs and, when
    given and not already set, ``GLOO_SOCKET_IFNAME`` (the interface gloo binds to)."""
    env = {k: v for k, v in base.items() if k not in INHERITED_DIST_VARS}
    if gloo_ifname and not env.get("GLOO_SOCKET_IFNAME"):
        env["GLOO_SOCKET_IFNAME"] = gloo_ifname
    if plan.use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(plan.threads_per_process))
    return env


def _env_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    return [f"{k}={shlex.quote(after[k])}" for k in sorted(after) if before.get(k) != after[k]]


def describe(plan: NodeLaunch, cmd: Sequence[str], base_env: Mapping[str, str], gloo_ifname: str | None = None) -> str:
    """One line: ``node RANK (HOST): VAR=VALUE ... COMMAND`` (the variables this module sets)."""
    changes = _env_changes(base_env, launch_environment(plan, base_env, gloo_ifname))
    host = plan.hostnames[plan.machine_rank]
    return f"node {plan.machine_rank} ({host}): " + " ".join(changes + [shlex.join(cmd)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distdet.launch.slurm",
        description="Run (or print) this Slurm node's `accelerate launch` command for TRAIN_SCRIPT.",
    )
    parser.add_argument("--cpu-procs", type=int, help="run N CPU processes per node (gloo), even with GPUs")
    parser.add_argument("--gpus-per-node", type=int, help="override GPU detection (0 = CPU)")
    parser.add_argument("--main-addr", help="main process address (default: first node's address)")
    parser.add_argument("--main-port", type=int, help="main process port (default: 29500 + job id %% 1000)")
    parser.add_argument("--machine-rank", type=int, help="this node's rank (default: SLURM_NODEID)")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, help="override the config's")
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="folder of Accelerate configs")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--all-nodes", action="store_true", help="with --dry-run: print every node's command")
    parser.add_argument("train_script", help="the training script, e.g. train.py")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments passed on to the script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    options = dict(
        cpu_procs=args.cpu_procs, gpus_per_node=args.gpus_per_node, main_addr=args.main_addr, main_port=args.main_port
    )
    machine_rank = args.machine_rank
    if machine_rank is None and args.dry_run and args.all_nodes and not env.get("SLURM_NODEID"):
        machine_rank = 0  # printing every node's command from outside a job step
    try:
        plan = plan_node(env, machine_rank=machine_rank, **options)
        ranks = range(plan.num_machines) if args.dry_run and args.all_nodes else [plan.machine_rank]
        commands = []
        for rank in ranks:
            node_plan = replace(plan, machine_rank=rank)
            cmd = accelerate_command(
                node_plan, args.train_script, args.train_args,
                config_dir=args.config_dir, mixed_precision=args.mixed_precision,
            )
            commands.append((node_plan, cmd))
    except SlurmPlanError as err:
        print(f"distdet.launch.slurm: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(describe(p, c, env) for p, c in commands), flush=True)
        return 0
    (plan, cmd), = commands
    ifname = route_interface(plan.main_process_ip) if plan.num_machines > 1 else None
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    line = describe(plan, cmd, env, ifname)
    print(f"distdet.launch.slurm: job {env.get('SLURM_JOB_ID')} restart {restarts}: {line}", flush=True)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec; see module docstring
    os.execve(cmd[0], cmd, launch_environment(plan, env, ifname))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
