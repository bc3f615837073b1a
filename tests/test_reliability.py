"""Guarantees under faults and bad input (docs/reliability.md): each one with the fault injected."""

import fcntl
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from efficientllm_metrics import read_results
from training_harness import checkpoint
from training_harness.cli import main
from training_harness.errors import EXIT_USAGE
from training_harness.locks import exclusive
from training_harness.prepare_data import PrepareConfig, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "2", "--micro_batch_size", "1", "--device", "cpu",
        "--eval_windows", "2", "--sample_interval_s", "0.02"]


def train(data_dir, output, *flags):
    return main("qwen", ["--data_path", data_dir, "--output_dir", str(output), *TINY, *flags])


def test_preparing_into_a_folder_of_someone_elses_files_is_refused(tmp_path, corpus_file, tokenizer_file, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    config = ["--source", str(corpus_file), "--tokenizer", tokenizer_file, "--output_dir", str(mine), "--workers", "1"]
    from training_harness.prepare_data import main as prepare_main

    assert prepare_main(config) == EXIT_USAGE
    assert "thesis.tex" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.tex"]


def test_a_failed_attempt_never_replaces_completed_results(data_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "3") == 0
    completed = read_results(output)
    # Extending the run with a micro-batch that cannot divide the batch fails in setup.
    assert train(data_dir, output, "--max_steps", "6", "--resume", "--micro_batch_size", "3") == EXIT_USAGE
    assert read_results(output) == completed
    attempts = [json.loads(line) for line in (output / "attempts.jsonl").read_text().splitlines()]
    assert [a["status"] for a in attempts] == ["completed", "failed"] and "micro_batch_size" in attempts[1]["error"]
    assert "completed results" in capsys.readouterr().err


def test_a_checkpoint_swap_cut_between_its_renames_still_resumes(data_dir, tmp_path, monkeypatch):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "2", "--checkpoint_interval", "1", "--no-final_checkpoint") == 0
    assert json.loads((output / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    os.replace(output / "checkpoint", output / ".checkpoint.old")  # the crash: old moved aside, new not yet in
    assert checkpoint.exists(output)  # finds it (puts it back)
    assert train(data_dir, output, "--max_steps", "4", "--resume") == 0
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # steps 2.. redone from the step-1 checkpoint


def test_resume_refuses_when_the_interrupted_runs_checkpoint_is_gone(data_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "2") == 0
    results = read_results(output)
    (output / "efficientllm_metrics.json").write_text(json.dumps({**results, "status": "interrupted"}))
    for name in os.listdir(output / "checkpoint"):
        os.unlink(output / "checkpoint" / name)
    os.rmdir(output / "checkpoint")
    assert train(data_dir, output, "--max_steps", "4", "--resume") == EXIT_USAGE
    assert "checkpoint is missing" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_tampered_optimizer_state_is_refused_and_never_run(data_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "2", "--save_optimizer") == 0
    (output / "checkpoint" / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    monkeypatch.chdir(tmp_path)
    assert train(data_dir, output, "--max_steps", "3", "--resume") == EXIT_USAGE
    assert "not a checkpoint this suite can load" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(data_dir, tmp_path, capsys):
    output = tmp_path / "run"
    with exclusive(output, "a run folder"):
        assert train(data_dir, output, "--max_steps", "2") == EXIT_USAGE
    message = capsys.readouterr().err
    assert f"PID {os.getpid()} on {socket.gethostname()}" in message and str(output) in message
    assert train(data_dir, output, "--max_steps", "2") == 0  # released with the block


@pytest.mark.parametrize("content, message", [
    ("", "not a readable JSON config"),
    ('{"max_steps": 10', "not a readable JSON config"),
    ('{"max_steps": "10"}', "max_steps must be int"),
    ('{"batch_size": 4.5}', "batch_size must be int or null"),
    (b"\xff\xfe{", "not a readable JSON config"),
])
def test_a_broken_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main("qwen", ["--config", str(path), "--data_path", "d", "--output_dir", str(tmp_path / "o")]) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu"], "device must be cuda, cuda:N or cpu"),
    (["--eval_windows", "-1"], "eval_windows must be 0 (all) or positive"),
    (["--val_fraction", "0"], "val_fraction must be in (0, 1)"),
])
def test_bad_flags_are_one_line_before_anything_runs(tmp_path, capsys, flags, message):
    assert main("qwen", ["--data_path", "d", "--output_dir", str(tmp_path / "o"), *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main("qwen", ["--data_path", "d", "--output_dir", str(tmp_path / "file" / "run")]) == EXIT_USAGE
    assert "cannot create it" in capsys.readouterr().err


def test_the_sweep_records_a_broken_config_as_failed_and_goes_on(tmp_path, data_dir):
    experiment = tmp_path / "experiment"
    (experiment / "configs").mkdir(parents=True)
    (experiment / "configs" / "mamba_0.5B.json").write_text('{"model": "mamba", "max_st')
    good = {"model": "qwen", "model_size": "0.5B", "preset": "tiny", "data_path": data_dir, "batch_size": 2,
            "micro_batch_size": 1, "seq_len": 32, "eval_windows": 2}
    (experiment / "configs" / "qwen_0.5B.json").write_text(json.dumps(good))
    env = {**os.environ, "EXPERIMENT_DIR": str(experiment), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dsw", "cpu",
                             "2"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 1
    summary = result.stdout.split("== summary")[1]
    assert "mamba_0.5B: failed (unreadable config" in summary and "qwen_0.5B: completed" in summary
    assert read_results(experiment / "results" / "mamba_0.5B")["status"] == "failed"


def sweep_of_two(tmp_path, data_dir):
    experiment = tmp_path / "experiment"
    (experiment / "configs").mkdir(parents=True)
    for model in ("pythia", "qwen"):
        config = {"model": model, "model_size": "0.5B", "preset": "tiny", "data_path": data_dir, "batch_size": 2,
                  "micro_batch_size": 1, "seq_len": 32, "eval_windows": 2, "sample_interval_s": 0.05}
        (experiment / "configs" / f"{model}_0.5B.json").write_text(json.dumps(config))
    env = {**os.environ, "EXPERIMENT_DIR": str(experiment), "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dsw", "cpu", "100000"]
    return experiment, command, env


def start_as_from_a_terminal(command: list[str], env: dict, background: bool = False) -> subprocess.Popen:
    """The sweep as a terminal's foreground job starts it, with SIGINT's default action, or as a background job,
    with SIGINT ignored. A shell ignores a signal it was started ignoring (and pytest run in the background of
    another shell would hand it SIGINT so), whatever its traps say."""
    sigint = signal.SIG_IGN if background else signal.SIG_DFL
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


@pytest.mark.parametrize(("background", "signum"), [(False, signal.SIGINT), (True, signal.SIGTERM)],
                         ids=["Ctrl-C in the foreground", "kill -TERM in the background"])
def test_ctrl_c_stops_the_whole_sweep_once_the_current_run_has_saved(tmp_path, data_dir, stop_runs_left_under,
                                                                     background, signum):
    experiment, command, env = sweep_of_two(tmp_path, data_dir)
    stop_runs_left_under(experiment)
    sweep = start_as_from_a_terminal(command, env, background)
    log = experiment / "results" / "pythia_0.5B" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep.send_signal(signum)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out + err
    assert read_results(experiment / "results" / "pythia_0.5B")["status"] == "interrupted"
    assert checkpoint.exists(experiment / "results" / "pythia_0.5B")
    assert not (experiment / "results" / "qwen_0.5B").exists()  # the next run never started
    assert "pythia_0.5B: interrupted" in out.split("== summary")[1] and "rerun the same command" in err


def test_ctrl_c_while_the_sweep_checks_a_run_starts_no_run(tmp_path, data_dir, stop_runs_left_under):
    """bash runs a trap only once the command it waits for has finished: a signal that comes while the driver
    asks Python about the next run is handled after the answer, and no run may start after it."""
    experiment, command, env = sweep_of_two(tmp_path, data_dir)
    stop_runs_left_under(experiment)
    asking = tmp_path / "asking"
    slow_python = tmp_path / "slow_python"  # an interpreter slow to answer "sweep model", to widen the window
    slow_python.write_text(f'#!/usr/bin/env bash\n'
                           f'[[ "$*" != *"training_harness.sweep model"* ]] || {{ touch {asking}; sleep 3; }}\n'
                           f'exec {sys.executable} "$@"\n')
    slow_python.chmod(0o755)
    sweep = start_as_from_a_terminal(command, {**env, "PYTHON": str(slow_python)})
    deadline = time.monotonic() + 60
    while not asking.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, out + err
    assert "== pythia_0.5B" not in out and "rerun the same command" in err
    assert not (experiment / "results" / "pythia_0.5B" / "log.jsonl").exists()  # the run never started


def test_a_run_that_another_sweep_holds_is_skipped_and_left_alone(tmp_path, data_dir):
    """Two sweeps share one experiment folder (one per GPU): each skips what the other is training."""
    experiment, command, env = sweep_of_two(tmp_path, data_dir)
    (experiment / "locks").mkdir()
    with open(experiment / "locks" / "pythia_0.5B.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("PID 4242 on elsewhere\n")
        handle.flush()
        result = subprocess.run([*command[:-1], "3"], capture_output=True, text=True, env=env, cwd=ROOT,
                                timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pythia_0.5B: skipped (in use by PID 4242 on elsewhere)" in result.stdout
    assert "qwen_0.5B: completed (exit 0)" in result.stdout
    assert not (experiment / "results" / "pythia_0.5B").exists()


def test_a_checkpoint_continues_only_its_own_run(data_dir, tmp_path, corpus_file, tokenizer_file, capsys):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "2") == 0
    pythia = main("pythia", ["--data_path", data_dir, "--output_dir", str(output), *TINY, "--max_steps", "4",
                             "--resume"])
    assert pythia == EXIT_USAGE and "family qwen, this run is of pythia" in capsys.readouterr().err
    other = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d2"),
                                  val_fraction=0.3, workers=1))
    assert train(str(other), output, "--max_steps", "4", "--resume") == EXIT_USAGE
    assert "trained on other data" in capsys.readouterr().err
    assert read_results(output)["steps"] == 2  # the completed run is untouched


def test_a_second_prepare_of_the_same_folder_is_refused(tmp_path, corpus_file, tokenizer_file, capsys):
    from training_harness.prepare_data import main as prepare_main

    output = tmp_path / "data"
    with exclusive(output, "a prepared data folder", beside=True):
        assert prepare_main(["--source", str(corpus_file), "--tokenizer", tokenizer_file, "--output_dir", str(output),
                             "--workers", "1"]) == EXIT_USAGE
    assert f"PID {os.getpid()}" in capsys.readouterr().err and not output.exists()


def soak_sweep(root: Path, data_dir: str, steps: int) -> tuple[Path, list[str], dict]:
    experiment = root / "experiment"
    (experiment / "configs").mkdir(parents=True)
    for model in ("mamba", "pythia", "qwen", "rwkv"):
        config = {"model": model, "model_size": "0.5B", "preset": "tiny", "data_path": data_dir, "batch_size": 2,
                  "micro_batch_size": 1, "seq_len": 32, "eval_windows": 2, "sample_interval_s": 0.05,
                  "checkpoint_interval": 1, "save_optimizer": True}
        (experiment / "configs" / f"{model}_0.5B.json").write_text(json.dumps(config))
    env = {**os.environ, "EXPERIMENT_DIR": str(experiment), "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dsw", "cpu", str(steps)]
    return experiment, command, env


def logged_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def kill_at_step(run: Path, step: int, signum: int, sweep: subprocess.Popen) -> bool:
    """Signal the run's own process (the PID its lock names) once its log reaches ``step``."""
    while sweep.poll() is None:
        lock = run / ".efficientllm.lock"
        holder = lock.read_text().split() if lock.exists() else []
        if (run / "log.jsonl").exists() and len(logged_losses(run)) >= step and holder:
            try:
                os.kill(int(holder[1]), signum)
                return True
            except ProcessLookupError:  # the PID of an attempt killed before: wait for the next one
                pass
        time.sleep(0.05)
    return False


def test_soak_a_sweep_killed_at_random_steps_ends_as_an_uninterrupted_one(tmp_path, data_dir):
    steps, rng = 4, random.Random(21)
    straight, command, env = soak_sweep(tmp_path / "straight", data_dir, steps)
    assert subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=300).returncode == 0
    soaked, command, env = soak_sweep(tmp_path / "soaked", data_dir, steps)
    faults = 0
    for _ in range(12):
        sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        pending = [f"{m}_0.5B" for m in ("mamba", "pythia", "qwen", "rwkv")
                   if not (soaked / "results" / f"{m}_0.5B" / "efficientllm_metrics.json").exists()
                   or read_results(soaked / "results" / f"{m}_0.5B")["status"] != "completed"]
        for name in pending:  # in the sweep's order; each run of the first round is cut, later ones by chance
            if faults < 4 or rng.random() < 0.25:
                signum = rng.choice([signal.SIGTERM, signal.SIGKILL])
                faults += kill_at_step(soaked / "results" / name, rng.randint(1, steps - 1), signum, sweep)
        if sweep.wait(timeout=300) == 0 and not pending:
            break
    assert faults >= 4  # every run was cut at least once
    for name in ("mamba_0.5B", "pythia_0.5B", "qwen_0.5B", "rwkv_0.5B"):
        assert read_results(soaked / "results" / name)["status"] == "completed"
        got, want = logged_losses(soaked / "results" / name), logged_losses(straight / "results" / name)
        assert [step for step, _ in got] == list(range(1, steps + 1))  # no step logged twice, none missing
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.txt"])
def test_text_that_is_not_utf8_is_one_line_naming_the_file(tmp_path, tokenizer_file, capsys, name):
    from training_harness.prepare_data import main as prepare_main

    source = tmp_path / name
    source.write_bytes(b'{"text": "caf\xe9"}\n' if name.endswith("jsonl") else b"caf\xe9\n")
    assert prepare_main(["--source", str(source), "--tokenizer", tokenizer_file, "--output_dir",
                         str(tmp_path / "out"), "--workers", "1"]) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{source}: not UTF-8 text" in error and "iconv" in error


def test_a_log_record_cut_short_by_a_kill_is_dropped_on_resume(data_dir, tmp_path):
    output = tmp_path / "run"
    assert train(data_dir, output, "--max_steps", "2", "--checkpoint_interval", "1", "--no-final_checkpoint") == 0
    with open(output / "log.jsonl", "a") as handle:
        handle.write('{"step": 2, "lo')  # SIGKILL in the middle of an append
    assert train(data_dir, output, "--max_steps", "4", "--resume") == 0
    assert [step for step, _ in logged_losses(output)] == [1, 2, 3, 4]
