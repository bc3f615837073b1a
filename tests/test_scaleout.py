"""The multi-node path on CPU: two driver processes acting as two nodes of one process each (gloo), by hand
(dlc) and through the Slurm launcher under a simulated Slurm (fake srun and scontrol, no Slurm needed)."""

import itertools
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from processes import abort_with_stacks

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "scripts" / "run_all_attention_free_experiments.sh"
STEPS = 5


def pick_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


free_port = pick_free_port  # the port each run's environment gets; a test can hand out a taken one first


def experiment_of_one(tmp_path: Path, data_dir: str) -> Path:
    """An experiment folder with one tiny config: a global batch of 2, one sequence per node per step."""
    experiment = tmp_path / "experiment"
    (experiment / "configs").mkdir(parents=True)
    config = {"model": "pythia", "model_size": "0.5B", "preset": "tiny", "data_path": data_dir, "batch_size": 2,
              "micro_batch_size": 1, "seq_len": 32, "eval_windows": 2, "sample_interval_s": 0.05}
    (experiment / "configs" / "pythia_0.5B.json").write_text(json.dumps(config))
    return experiment


def environment(experiment: Path, **extra: str) -> dict:
    """The drivers' environment; Python prints every thread's stack on SIGABRT (``finish`` past its deadline)."""
    return {**os.environ, "EXPERIMENT_DIR": str(experiment), "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "PYTHONFAULTHANDLER": "1", **extra}


def assert_one_result_for_both_nodes(experiment: Path) -> None:
    results = json.loads((experiment / "results" / "pythia_0.5B" / "efficientllm_metrics.json").read_text())
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["tokens"] == (STEPS - 3) * 2 * 32  # both nodes' tokens after the 3 warm-up iterations
    assert (experiment / "results" / "pythia_0.5B" / "efficientllm_timeline_rank1.csv").exists()
    assert (experiment / "logs" / "pythia_0.5B.node1.log").exists()  # node 1 logs beside node 0, not into its log


def finish(node: subprocess.Popen, deadline: float, experiment: Path) -> str:
    """The node's output once it exits; past the deadline, stopped, with where the experiment's processes waited
    (their stacks go to the runs' logs, which follow)."""
    try:
        return node.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
    except subprocess.TimeoutExpired:
        waiting = abort_with_stacks(experiment)
        time.sleep(2)  # for their stacks to reach the logs
        node.kill()
        logs = "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-6000:]}"
                       for log in sorted((experiment / "logs").glob("*.log")))
        return node.communicate()[0] + f"\n[stopped at the test's deadline; its processes then:]\n{waiting}{logs}"


def run_two_nodes(tmp_path: Path, data_dir: str, timeout_s: float = 300,
                  attempts: int = 3) -> tuple[Path, list[int | None], list[str]]:
    """Both nodes' drivers of one run: its experiment folder, exit codes and outputs. A free port can be taken
    between picking it and node 0 binding it, and node 1 would then wait for node 0 until its own timeout; so
    a run whose node 0 found its port in use starts again, in a new folder on another port."""
    for attempt in itertools.count():
        experiment = experiment_of_one(tmp_path / f"attempt{attempt}", data_dir)
        env = environment(experiment, NNODES="2")
        nodes = [subprocess.Popen(["bash", str(DRIVER), "dlc", "cpu", str(STEPS)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env={**env, "NODE_RANK": str(rank)})
                 for rank in (0, 1)]
        deadline = time.monotonic() + timeout_s
        first = finish(nodes[0], deadline, experiment)
        if "address already in use" in first.lower() and attempt + 1 < attempts:
            finish(nodes[1], time.monotonic(), experiment)
            continue
        outputs = [first, finish(nodes[1], deadline, experiment)]
        return experiment, [node.returncode for node in nodes], outputs


def test_two_nodes_by_hand_give_one_result_of_both(tmp_path, data_dir, stop_runs_left_under):
    stop_runs_left_under(tmp_path)
    experiment, codes, outputs = run_two_nodes(tmp_path, data_dir)
    assert codes == [0, 0], outputs
    assert all("pythia_0.5B: completed (exit 0)" in output for output in outputs)
    assert_one_result_for_both_nodes(experiment)


def test_a_port_taken_before_node_0_binds_it_costs_a_new_attempt_not_a_hang(tmp_path, data_dir, monkeypatch,
                                                                            stop_runs_left_under):
    stop_runs_left_under(tmp_path)  # the first attempt's node 1, whose driver is killed, leaves its run waiting
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: next(ports, None) or pick_free_port())
        experiment, codes, outputs = run_two_nodes(tmp_path, data_dir, timeout_s=120)
    assert codes == [0, 0], outputs
    assert experiment.parent.name == "attempt1"  # the first attempt met the taken port


def fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


FAKE_SRUN = """import json, os, subprocess, sys
args = sys.argv[1:]
tasks = int(next(a.split("=", 1)[1] for a in args if a.startswith("--ntasks=")))
command = [a for a in args if not a.startswith("--")]
with open(os.environ["SRUN_RECORD"], "a") as record:
    record.write(json.dumps({"tasks": tasks, "command": command}) + "\\n")
nodes = [subprocess.Popen(command, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)})
         for i in range(tasks)]
sys.exit(max(node.wait() for node in nodes))
"""
FAKE_SCONTROL = """import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("127.0.0.1\\n127.0.0.2")
"""


def test_the_slurm_launcher_maps_slurms_variables_and_starts_a_driver_per_node(tmp_path, data_dir):
    experiment = experiment_of_one(tmp_path, data_dir)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    fake_command(fakes, "srun", FAKE_SRUN)
    fake_command(fakes, "scontrol", FAKE_SCONTROL)
    env = environment(experiment, PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
                      SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(ROOT), DEVICES="cpu",
                      SRUN_RECORD=str(tmp_path / "srun.jsonl"))
    del env["MASTER_ADDR"]  # the launcher takes it from the job's first node
    result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "run_attention_free.sbatch"), str(STEPS)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"== 2 nodes, first 127.0.0.1:{env['MASTER_PORT']}, devices cpu per node" in result.stdout
    [launch] = [json.loads(line) for line in (tmp_path / "srun.jsonl").read_text().splitlines()]
    assert launch["tasks"] == 2 and launch["command"][:2] == ["bash", "-c"]
    assert "scripts/run_all_attention_free_experiments.sh dlc" in launch["command"][2]
    assert launch["command"][3:] == ["driver", str(STEPS)]
    assert result.stdout.count("pythia_0.5B: completed (exit 0)") == 2  # both nodes' summaries
    assert_one_result_for_both_nodes(experiment)
