"""Slurm launch: node-list parsing, the per-node `accelerate launch` command (dry run of the real
multi-node sbatch script with a 2-node job's environment), and jobs on a real one-node Slurm
cluster (tests/support/slurm_cluster.py) running the real sbatch scripts with 2 CPU processes."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distdet.launch.slurm import (
    SlurmPlanError,
    accelerate_command,
    expand_hostlist,
    gpus_on_node,
    launch_environment,
    plan_node,
    port_for_job,
    route_interface,
)
from support.slurm_cluster import SlurmCluster, slurm_cluster, slurm_cluster_2nodes  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SBATCH_DIR = REPO / "launch" / "slurm"
PROBE = REPO / "tests" / "support" / "launch_probe.py"

# What Slurm sets for a job on two nodes with 4 GPUs each (job 734512).
TWO_NODE_ENV = {
    "SLURM_JOB_ID": "734512",
    "SLURM_JOB_NAME": "distdet",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_GPUS_PER_NODE": "4",
    "SLURM_NTASKS_PER_NODE": "",  # empty unless --ntasks-per-node: must never become LOCAL_WORLD_SIZE
    "SLURM_SUBMIT_DIR": str(REPO),
}


def _no_slurm_env(**extra: str) -> dict[str, str]:
    """The test process's environment without Slurm or torch launcher variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _parse_dry_run(stdout: str) -> dict[int, dict]:
    """{machine rank: {"host", "env", "argv", "flags", "script_args"}} from --dry-run output."""
    nodes = {}
    for line in stdout.strip().splitlines():
        head, _, rest = line.partition(": ")
        _, rank, host = head.split()
        words = shlex.split(rest)
        env = {}
        while "=" in words[0] and not words[0].startswith("/"):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        assert words[1:3] == ["-m", "accelerate.commands.launch"], line
        flags, i = {}, 3
        while words[i].startswith("--"):
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                flags[words[i]] = words[i + 1]
                i += 2
            else:
                flags[words[i]] = True
                i += 1
        nodes[int(rank)] = dict(host=host.strip("()"), env=env, argv=words, flags=flags, script=words[i],
                                script_args=words[i + 1 :])
    return nodes


# -- node lists ------------------------------------------------------------------------------
def test_expand_hostlist_ranges_lists_and_plain_names():
    assert expand_hostlist("a[1-3,5],b7") == ["a1", "a2", "a3", "a5", "b7"]
    assert expand_hostlist("node[01-02]") == ["node01", "node02"]
    assert expand_hostlist("gpu[008-011]") == ["gpu008", "gpu009", "gpu010", "gpu011"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_hostlist("login,c[9-10]-ib") == ["login", "c9-ib", "c10-ib"]
    assert expand_hostlist("localhost") == ["localhost"]


@pytest.mark.parametrize("bad", ["", "a[1-", "a[3-1]", "a[x]", "a]1[", "a,,b", "a[1-[2]]"])
def test_expand_hostlist_rejects_malformed_lists(bad):
    with pytest.raises(SlurmPlanError):
        expand_hostlist(bad)


def test_port_is_stable_per_job_and_in_range():
    assert port_for_job(734512) == 29500 + 512
    assert port_for_job("734512") == port_for_job(734512)
    assert {port_for_job(j) for j in range(5000)} <= set(range(29500, 30500))


def test_gpu_count_from_slurm_variables():
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}) == 4
    assert gpus_on_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4
    assert gpus_on_node({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}) == 3
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "", "CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert gpus_on_node({"CUDA_VISIBLE_DEVICES": ""}) == 0


# -- the per-node command ------------------------------------------------------------------
def _run_dry_sbatch(script: str, extra_env: dict[str, str], *train_args: str, path: str | None = None):
    env = _no_slurm_env(**{**TWO_NODE_ENV, "DISTDET_PYTHON": sys.executable, "DISTDET_DRY_RUN": "1", **extra_env})
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["bash", str(SBATCH_DIR / script), *train_args], env=env, capture_output=True, text=True, timeout=120
    )


def test_multi_node_dry_run_gives_every_node_its_rank_the_main_address_port_and_total():
    # PATH without Slurm's clients: the node list is expanded by the pure-Python parser.
    result = _run_dry_sbatch("multi_node.sbatch", {}, "--epochs", "3", "--seed", "7", path="/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    nodes = _parse_dry_run(result.stdout)
    assert sorted(nodes) == [0, 1]
    assert [nodes[r]["host"] for r in (0, 1)] == ["node01", "node02"]
    for rank, node in nodes.items():
        flags = node["flags"]
        assert flags["--machine_rank"] == str(rank)
        assert flags["--num_machines"] == "2"
        assert flags["--num_processes"] == "8"  # 2 nodes x 4 GPUs
        assert flags["--main_process_ip"] == "node01"
        assert flags["--main_process_port"] == str(29500 + 734512 % 1000)
        assert Path(flags["--config_file"]).name == "multi_node.yaml"
        assert node["script"] == str(REPO / "train.py")
        run_dir = str(REPO / "runs" / "distdet-734512")
        assert node["script_args"] == ["--output-dir", run_dir, "--resume", "auto", "--epochs", "3", "--seed", "7"]
        assert "LOCAL_WORLD_SIZE" not in node["env"] and "ACCELERATE_USE_CPU" not in node["env"]


def test_each_node_prints_its_own_command_from_slurm_nodeid():
    for node_id in ("0", "1"):
        env = _no_slurm_env(**TWO_NODE_ENV, SLURM_NODEID=node_id)
        result = subprocess.run(
            [sys.executable, "-m", "distdet.launch.slurm", "--dry-run", "train.py", "--epochs", "1"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        (rank, node), = _parse_dry_run(result.stdout).items()
        assert rank == int(node_id) and node["flags"]["--machine_rank"] == node_id
        assert node["script_args"] == ["--epochs", "1"]


def test_cpu_processes_use_the_cpu_config_and_mark_the_workers_cpu():
    result = _run_dry_sbatch(
        "multi_node.sbatch", {"DISTDET_CPU_PROCS": "2", "SLURM_CPUS_ON_NODE": "8", "DISTDET_MIXED_PRECISION": "bf16"}
    )
    assert result.returncode == 0, result.stderr
    nodes = _parse_dry_run(result.stdout)
    for node in nodes.values():
        assert Path(node["flags"]["--config_file"]).name == "cpu_2proc.yaml"
        assert node["flags"]["--num_processes"] == "4"  # 2 nodes x 2 CPU processes
        assert node["flags"]["--mixed_precision"] == "bf16"
        assert node["env"]["ACCELERATE_USE_CPU"] == "true"
        assert node["env"]["OMP_NUM_THREADS"] == "4"  # 8 CPUs / 2 processes


def test_single_node_dry_run_on_one_gpu_uses_the_single_gpu_config():
    env = {"SLURM_JOB_NODELIST": "gpu17", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1"}
    result = _run_dry_sbatch("single_node.sbatch", env, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    (node,) = _parse_dry_run(result.stdout).values()
    assert Path(node["flags"]["--config_file"]).name == "single_gpu.yaml"
    assert node["flags"]["--num_processes"] == "1" and "--main_process_ip" not in node["flags"]


def test_launch_environment_drops_inherited_launcher_variables():
    plan = plan_node({**TWO_NODE_ENV, "SLURM_NODEID": "0"}, cpu_procs=2)
    base = {"LOCAL_WORLD_SIZE": "", "WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1", "HOME": "/root"}
    env = launch_environment(plan, base)
    assert not {"LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "MASTER_PORT"} & set(env)
    assert env["HOME"] == "/root" and env["ACCELERATE_USE_CPU"] == "true"
    cmd = accelerate_command(plan, "train.py")
    assert cmd[cmd.index("--num_processes") + 1] == "4"


def _local_interfaces() -> dict[str, str]:
    import fcntl
    import socket
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def test_route_interface_names_the_interface_holding_the_address_and_never_loopback():
    assert route_interface("127.0.0.1") is None
    assert route_interface("no-such-host.invalid") is None
    others = {name: ip for name, ip in _local_interfaces().items() if not ip.startswith("127.")}
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    for name, ip in others.items():
        assert route_interface(ip) == name


def test_bad_job_environments_are_refused_with_the_variable_named():
    with pytest.raises(SlurmPlanError, match="SLURM_JOB_NODELIST"):
        plan_node({"SLURM_JOB_ID": "1", "SLURM_NODEID": "0"})
    with pytest.raises(SlurmPlanError, match="SLURM_NNODES=3"):
        plan_node({**TWO_NODE_ENV, "SLURM_NNODES": "3", "SLURM_NODEID": "0"})
    with pytest.raises(SlurmPlanError, match="SLURM_NODEID"):
        plan_node(TWO_NODE_ENV)
    with pytest.raises(SlurmPlanError, match="machine rank 2"):
        plan_node({**TWO_NODE_ENV, "SLURM_NODEID": "2"})
    result = subprocess.run(
        [sys.executable, "-m", "distdet.launch.slurm", "--dry-run", "train.py"],
        env=_no_slurm_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "SLURM_JOB_NODELIST is not set" in result.stderr


# -- a real Slurm cluster --------------------------------------------------------------------
slurm_mark = pytest.mark.slurm


@slurm_mark
def test_cluster_runs_sbatch_wait_and_srun(slurm_cluster: SlurmCluster, tmp_path):
    assert slurm_cluster.run(["sinfo", "-h", "-o", "%t"]).stdout.strip() == "idle"
    out = tmp_path / "hello.out"
    result = slurm_cluster.run(["sbatch", "--wait", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID"])
    job_id = result.stdout.split()[-1]
    assert out.read_text().strip() == f"hello from {job_id}"
    failing = slurm_cluster.run(["sbatch", "--wait", "-o", os.devnull, "--wrap", "exit 3"], check=False)
    assert failing.returncode == 3
    tasks = slurm_cluster.run(["srun", "-n", "2", "bash", "-c", "echo $SLURM_PROCID"]).stdout.split()
    assert sorted(tasks) == ["0", "1"]


@slurm_mark
def test_scontrol_and_the_python_parser_expand_node_lists_alike(slurm_cluster: SlurmCluster):
    for expr in ("a[1-3,5],b7", "node[01-02]", "gpu[008-011],login", "r[1-2]n[1-2]"):
        out = slurm_cluster.run(["scontrol", "show", "hostnames", expr]).stdout.split()
        assert out == expand_hostlist(expr), expr


def _submit(cluster: SlurmCluster, tmp_path: Path, *train_args: str, script: str = "single_node.sbatch",
            **env: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    job_env = {
        "DISTDET_PYTHON": sys.executable,
        "DISTDET_CPU_PROCS": "2",
        "DISTDET_OUTPUT_DIR": str(run_dir),
        "DISTDET_TRAIN_SCRIPT": str(PROBE),
        "PYTHONPATH": str(REPO),
        "LOCAL_WORLD_SIZE": "",  # as a careless job script would export it from SLURM_NTASKS_PER_NODE
        **env,
    }
    result = cluster.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
         "-o", str(tmp_path / "slurm.out"), str(SBATCH_DIR / script), *train_args],
        env=job_env, cwd=REPO,
    )
    return result.stdout.strip().split(";")[0], run_dir


def _reports(run_dir: Path, restart: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob(f"probe-restart{restart}-rank*.json"))]


@slurm_mark
@pytest.mark.slow
def test_multi_node_script_runs_one_gloo_group_across_two_slurm_nodes(slurm_cluster_2nodes: SlurmCluster, tmp_path):
    cluster = slurm_cluster_2nodes
    job_id, run_dir = _submit(cluster, tmp_path, script="multi_node.sbatch", DISTDET_CPU_PROCS="1")  # --nodes=2 in the script
    state, exit_code = cluster.wait_for_job(job_id, timeout=240)
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("node*.log")}
    assert (state, exit_code) == ("COMPLETED", "0:0"), logs
    assert sorted(logs) == ["node0.log", "node1.log"]  # one log per node
    reports = _reports(run_dir, 0)
    first_node = cluster.nodes[0]
    assert [(r["rank"], r["env"]["SLURM_NODEID"], r["env"]["SLURMD_NODENAME"]) for r in reports] == [
        (0, "0", first_node.name), (1, "1", cluster.nodes[1].name)]
    for r in reports:
        assert r["num_processes"] == 2 and r["dist_world_size"] == 2 and r["dist_backend"] == "gloo"
        assert r["all_reduce_sum"] == 3.0  # 1 + 2: the two nodes really exchanged data
        assert r["env"]["MASTER_ADDR"] == first_node.addr  # the first node's NodeAddr
        assert r["env"]["MASTER_PORT"] == str(port_for_job(job_id))
        assert r["extra_args"] == []
    assert all("GLOO_SOCKET_IFNAME=" in text for text in logs.values())


@slurm_mark
def test_single_node_script_starts_two_real_gloo_ranks_on_cpu(slurm_cluster: SlurmCluster, tmp_path):
    job_id, run_dir = _submit(slurm_cluster, tmp_path, "--extra", "passed")
    state, exit_code = slurm_cluster.wait_for_job(job_id, timeout=240)
    node_log = (run_dir / "logs" / "node0.log").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), node_log
    reports = _reports(run_dir, 0)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["num_processes"] == 2 and r["dist_world_size"] == 2 and r["dist_backend"] == "gloo"
        assert r["all_reduce_sum"] == 3.0
        assert r["resume"] == "auto" and r["extra_args"] == ["--extra", "passed"]
        assert r["env"]["LOCAL_WORLD_SIZE"] == "2"
        assert r["env"]["MASTER_PORT"] == str(port_for_job(job_id))
    assert f"job {job_id} restart 0" in (run_dir / "logs" / "batch.log").read_text()
    assert "accelerate.commands.launch" in node_log


@slurm_mark
@pytest.mark.slow
@pytest.mark.parametrize("target", ["steps", "batch"])
def test_usr1_reaches_every_rank_and_the_requeued_job_runs_again(slurm_cluster: SlurmCluster, tmp_path, target):
    job_id, run_dir = _submit(slurm_cluster, tmp_path, "--wait-for-usr1")
    deadline = time.monotonic() + 180
    while not all((run_dir / f"ready-rank{k}").exists() for k in (0, 1)):
        assert time.monotonic() < deadline, "the ranks never became ready"
        assert slurm_cluster.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), slurm_cluster.logs()
        time.sleep(0.2)
    # "steps": what --signal=USR1@120 does before the time limit (every process of the steps);
    # "batch": what --signal=B:USR1@120 does (only the batch shell, which passes it on).
    slurm_cluster.run(["scancel", "--signal=USR1", *(["--batch"] if target == "batch" else []), job_id])
    state, exit_code = slurm_cluster.wait_for_job(job_id, timeout=240)
    assert (state, exit_code) == ("COMPLETED", "0:0"), (run_dir / "logs" / "node0.log").read_text()
    assert slurm_cluster.job_field(job_id, "Restarts") == "1"
    assert [r["got_usr1"] for r in _reports(run_dir, 0)] == [True, True]
    second = _reports(run_dir, 1)
    assert [r["rank"] for r in second] == [0, 1] and all(r["num_processes"] == 2 for r in second)
    batch_log = (run_dir / "logs" / "batch.log").read_text()
    assert f"job {job_id} restart 0" in batch_log and f"job {job_id} restart 1" in batch_log
    assert ("batch shell: SIGUSR1, passing it to the step" in batch_log) == (target == "batch")


@slurm_mark
@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_quickly_naming_the_rank(slurm_cluster: SlurmCluster, tmp_path, how):
    job_id, run_dir = _submit(slurm_cluster, tmp_path, "--fail-rank", "1", "--fail-how", how)
    deadline = time.monotonic() + 180
    while len(_reports(run_dir, 0)) < 2:  # both ranks up; the failure comes right after
        assert time.monotonic() < deadline and slurm_cluster.job_field(job_id, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    started = time.monotonic()
    state, exit_code = slurm_cluster.wait_for_job(job_id, timeout=120)
    assert time.monotonic() - started < 60
    assert state == "FAILED" and exit_code != "0:0"
    node_log = (run_dir / "logs" / "node0.log").read_text()
    root_cause = node_log.split("Root Cause (first observed failure)")[-1]
    assert "Root Cause" in node_log and re.search(r"rank\s*:\s*1\b", root_cause), node_log[-3000:]
    if how == "raise":
        assert "probe failure injected on rank 1" in node_log
