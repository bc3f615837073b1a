"""The sweep driver end to end on tiny configs, and the collector on crafted result folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from training_harness import report as collector
from training_harness.config import parse_config
from training_harness.prepare_data import PrepareConfig, prepare
from training_harness.registry import get_family
from training_harness.sweep import generate, plan_flags

ROOT = Path(__file__).resolve().parents[1]


def run_driver(experiment_dir, *args):
    env = {**os.environ, "EXPERIMENT_DIR": str(experiment_dir), "EXTRA_ARGS": "--eval_windows 2 --seq_len 32",
           "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_driver_runs_records_failures_and_skips_completed(tmp_path, tokenizer_file, corpus_file):
    data_root = tmp_path / "data"
    prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, val_fraction=0.2, workers=1,
                          output_dir=str(data_root / Path(tokenizer_file).parent.name)))
    experiment = tmp_path / "experiment"
    generate(["pythia", "mamba"], ["0.5B"], "tiny", 3, 32, str(data_root), experiment / "configs",
             {"pythia": tokenizer_file, "mamba": tokenizer_file}, micro_batch_size=4)
    broken = json.loads((experiment / "configs" / "mamba_0.5B.json").read_text())
    broken["data_path"] = str(tmp_path / "no-such-data")
    (experiment / "configs" / "rwkv_0.5B.json").write_text(json.dumps({**broken, "model": "rwkv"}))

    first = run_driver(experiment, "dsw", "cpu", "3")
    assert first.returncode == 1, first.stderr
    lines = first.stdout.split("== summary")[1].strip().splitlines()[1:]
    assert lines[:2] == ["mamba_0.5B: completed (exit 0)", "pythia_0.5B: completed (exit 0)"]
    assert lines[2].startswith("rwkv_0.5B: failed (exit 2): ") and "no-such-data" in lines[2]  # the cause
    failed = json.loads((experiment / "results" / "rwkv_0.5B" / "efficientllm_metrics.json").read_text())
    assert failed["status"] == "failed" and "no-such-data" in failed["error"]
    assert "no-such-data" in (experiment / "logs" / "rwkv_0.5B.log").read_text()

    second = run_driver(experiment, "dsw", "cpu", "3", "mamba", "rwkv")
    lines = second.stdout.split("== summary")[1].strip().splitlines()[1:]
    assert lines[0] == "mamba_0.5B: skipped (already completed)" and lines[1].startswith("rwkv_0.5B: failed (exit 2)")


def test_generated_paper_configs_carry_the_gpu_plan(tmp_path):
    written = generate(["qwen", "pythia", "mamba", "rwkv"], ["0.5B", "1.5B", "3B"], "paper", 100, 8192, "data",
                       tmp_path, {})
    assert len(written) == 12
    for path in written:
        config = parse_config(["--config", str(path), "--output_dir", "o"], path.stem.split("_")[0], "")
        assert config.compile and config.global_batch == {"0.5B": 8, "1.5B": 4, "3B": 2}[config.model_size]
        assert (config.data_order, config.eval_interval, config.eval_windows) == ("sequential", 50, 0)
        micro, accumulation = config.batch_plan(world_size=1)  # the micro-batch divides the spec's batch
        assert (micro, config.activation_checkpointing) == (
            get_family(config.model).gpu_plan[config.model_size]["micro_batch_size"],
            get_family(config.model).gpu_plan[config.model_size].get("activation_checkpointing", False))
        flags = parse_config(["--model_size", config.model_size, "--data_path", "data", "--output_dir", "o",
                              *plan_flags(config.model, config.model_size)], config.model, "")
        planned = ("micro_batch_size", "activation_checkpointing", "checkpoint_blocks", "compile", "attention",
                   "cuda_graphs")
        assert [getattr(flags, key) for key in planned] == [getattr(config, key) for key in planned]
    tiny = json.loads(generate(["rwkv"], ["3B"], "tiny", 10, 64, "data", tmp_path / "tiny", {})[0].read_text())
    assert not tiny["compile"] and not tiny["activation_checkpointing"] and "micro_batch_size" not in tiny


@pytest.mark.parametrize("args, message", [
    ([], "usage"), (["xyz", "cpu", "10"], "mode must be dsw or dlc"), (["dsw", "tpu:0", "10"], "devices must be"),
    (["dsw", "cpu", "ten"], "max_steps must be"),
])
def test_driver_usage_errors(tmp_path, args, message):
    result = run_driver(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr


def completed(model, size, params, ppl, amu, al, tt, aec, bpb=1.0, **extra):
    return {"schema_version": 1, "status": "completed", "model": model, "size": size, "preset": "paper",
            "params": params, "context": 8192, "steps": 100, "global_batch": 8, "world_size": 1,
            "device_name": "NVIDIA H100 80GB HBM3", "kernel_path": "k", "ppl": ppl, "bpb": bpb, "amu_gb": amu,
            "al_s_per_iter": al, "tt_tokens_per_param_s": tt, "aec_w": aec, "energy_j_per_token": 0.005,
            "latency": {"p90_s": al}, "provenance": {"measured_iterations": 90, "warmup_iterations": 10,
                                                     "methods": {"aec_w": "NVML counter unsupported"}}, **extra}


def write_run(results, name, document, commit="c0ffee" * 6, passes=0.5, losses=(7.0, 6.0), val=(6.9, 6.1),
              host="node-1"):
    """A run folder as a sweep leaves it: results, config.json (data, budget, commit) and log.jsonl."""
    folder = results / name
    folder.mkdir(parents=True)
    (folder / "efficientllm_metrics.json").write_text(json.dumps(document))
    data = {"source": "/data/corpus.jsonl", "tokenizer": "/tok/gpt-neox-20b", "training_tokens": 6_553_600,
            "training_passes": passes}
    (folder / "config.json").write_text(json.dumps({"data": data, "git": {"commit": commit, "dirty": False},
                                                    "host": host}))
    records = [{"step": 50 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    records += [{"step": 50 * (i + 1), "val_loss": v, "val_bpb": v / 3} for i, v in enumerate(val)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_collector_on_crafted_results(tmp_path):
    results = tmp_path / "results"
    configs = tmp_path / "configs"
    configs.mkdir()
    write_run(results, "qwen_0.5B", completed("qwen", "0.5B", 494_032_768, 20.5, 30.2, 0.9, 150.0, 650.0,
                                              bpb=1.25, window_s=81.0, sm_clock_mean_mhz=1842.5))
    write_run(results, "mamba_0.5B", completed("mamba", "0.5B", 129_153_792, 25.25, 12.0, 0.4, 900.0, None,
                                               bpb=1.5, window_s=36.0))
    (results / "pythia_0.5B").mkdir(parents=True)
    (results / "pythia_0.5B" / "efficientllm_metrics.json").write_text(json.dumps(
        {"schema_version": 1, "status": "oom", "model": "pythia", "size": "0.5B",
         "error": "CUDA out of memory. Tried to allocate 9.3 GiB", "params": 405_334_016}))
    (results / "rwkv_0.5B").mkdir()
    (results / "rwkv_0.5B" / "efficientllm_metrics.json").write_text('{"status": "compl')
    (configs / "qwen_1.5B.json").write_text("{}")  # configured, never ran

    frame = collector.collect([results], tmp_path / "tables")
    table = pd.read_csv(tmp_path / "tables" / "attention_free_results.csv").set_index(["model", "size"])
    assert table.loc[("qwen", "0.5B"), "ppl"] == 20.5 and table.loc[("qwen", "0.5B"), "status"] == "completed"
    assert table.loc[("qwen", "0.5B"), "corpus"] == "corpus.jsonl"
    assert table.loc[("qwen", "0.5B"), "sm_clock_mean_mhz"] == 1842.5
    assert pd.isna(table.loc[("mamba", "0.5B"), "sm_clock_mean_mhz"])  # results written before the clock
    assert table.loc[("qwen", "0.5B"), "train_val_gap"] == pytest.approx(6.1 - 6.5)
    assert table.loc[("pythia", "0.5B"), "status"] == "oom"
    assert "Tried to allocate" in table.loc[("pythia", "0.5B"), "reason"]
    assert table.loc[("rwkv", "0.5B"), "status"] == "corrupt"
    assert table.loc[("qwen", "1.5B"), "status"] == "missing"
    assert len(frame) == 5

    tex = (tmp_path / "tables" / "attention_free_table.tex").read_text()
    rows = {line.split(" & ")[0]: line for line in tex.splitlines() if " & 0.5B & " in line}
    # Best per size by BPB, never by PPL (per token of different tokenizers): Qwen's lower PPL is not bold.
    assert rows["Qwen2.5"] == (r"Qwen2.5 & 0.5B & 494.0M & 8K & 20.5 & \textbf{1.250} & 30.2 & 0.900 & 1.50e+02 & "
                               r"\textbf{650} & \textbf{5.0} \\")  # a tie: both bold
    assert rows["Mamba"] == (r"Mamba & 0.5B & 129.2M & 8K & 25.2 & 1.500 & \textbf{12.0} & \textbf{0.400} & "
                             r"\textbf{9.00e+02} & n/m\textsuperscript{1} & \textbf{5.0} \\")
    assert r"\multicolumn{7}{l}{\textit{OOM: CUDA out of memory. Tried to allocate 9.3 GiB}}" in rows["Pythia"]
    assert r"\textit{CORRUPT: efficientllm\_metrics.json:" in rows["RWKV-7"]
    assert r"1: NVML counter unsupported" in tex and "NVIDIA H100 80GB HBM3" in tex and "$10^9$ bytes" in tex
    assert "MISSING: no efficientllm\\_metrics.json" in tex
    # The caption states what the runs recorded: corpus, budget, warm-up, commit.
    assert "on corpus.jsonl (0.5B: 6.6M tokens in 100 steps" in tex and "first 10 of 100 iterations" in tex
    assert "commit c0ffeec0ffee" in tex

    report = (tmp_path / "tables" / "attention_free_report.txt").read_text()
    assert "0.5B BPB: Qwen2.5 (1.250)" in report and "0.5B AL (s/iter): Mamba (0.400)" in report
    assert "Pythia 0.5B: oom - CUDA out of memory" in report
    assert "Mamba 0.5B: aec_w not measured - NVML counter unsupported" in report
    assert "left out: 0.5B (Pythia oom, RWKV-7 corrupt); 1.5B (Qwen2.5 missing" in report
    for stem in ("bpb", "energy_j_per_token", "val_bpb_curves_0.5B", "loss_curves_0.5B"):
        assert (tmp_path / "tables" / f"{stem}.png").stat().st_size > 0
        assert (tmp_path / "tables" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_collector_flags_what_weakens_a_comparison(tmp_path):
    results = tmp_path / "results"
    write_run(results, "qwen_0.5B", completed("qwen", "0.5B", 1, 20.5, 30.2, 0.9, 150.0, 650.0),
              passes=3.5, losses=(0.01, 0.01), val=(8.0, 9.03))
    write_run(results, "mamba_0.5B", completed("mamba", "0.5B", 1, 25.0, 12.0, 0.4, 900.0, 600.0,
                                               device_name="NVIDIA H200"), commit="beef" * 10, host="node-2")
    lines = collector.anomalies(collector.collect([results], tmp_path / "tables"))
    assert "Qwen2.5 0.5B: 3.50 passes over its training text (text repeated)" in lines
    assert ("Qwen2.5 0.5B: validation loss 9.03 is 9.02 nats above the final training loss 0.01: memorisation"
            in lines)
    assert "rows come from different hardware: NVIDIA H100 80GB HBM3: Qwen2.5 0.5B; NVIDIA H200: Mamba 0.5B" in lines
    assert "rows come from different commits: c0ffeec0ffee: Qwen2.5 0.5B; beefbeefbeef: Mamba 0.5B" in lines
    assert "rows come from different hosts: node-1: Qwen2.5 0.5B; node-2: Mamba 0.5B" in lines


def test_collector_makes_one_table_of_several_sweeps_at_chosen_sizes(tmp_path, capsys):
    paper, beyond = tmp_path / "paper" / "results", tmp_path / "beyond" / "results"
    write_run(paper, "qwen_0.5B", completed("qwen", "0.5B", 1, 20.5, 30.2, 0.9, 150.0, 650.0))
    write_run(paper, "qwen_1.5B", completed("qwen", "1.5B", 1, 20.5, 30.2, 0.9, 150.0, 650.0))
    write_run(beyond, "mamba2_0.5B", completed("mamba2", "0.5B", 1, 25.0, 12.0, 0.4, 900.0, 600.0))
    (beyond.parent / "configs").mkdir()
    (beyond.parent / "configs" / "gated_deltanet_0.5B.json").write_text("{}")  # configured, never ran
    frame = collector.collect([paper, beyond], tmp_path / "tables", sizes=["0.5B"]).set_index("model")
    assert sorted(frame.index) == ["gated_deltanet", "mamba2", "qwen"]
    assert frame.loc["gated_deltanet", "status"] == "missing" and frame.loc["mamba2", "status"] == "completed"
    write_run(beyond, "qwen_0.5B", completed("qwen", "0.5B", 1, 20.5, 30.2, 0.9, 150.0, 650.0))
    assert collector.main(["--results_dir", str(paper), str(beyond), "--output_dir", str(tmp_path / "t")]) == 2
    assert f"run qwen_0.5B is in both {paper} and {beyond}" in capsys.readouterr().err


def test_every_figure_gives_a_family_the_same_colour_and_marker():
    from training_harness.figures import family_styles

    four, five = family_styles(["rwkv", "qwen"]), family_styles(["toy", "mamba"])
    assert [four[m] for m in ("qwen", "pythia", "mamba", "rwkv")] == [five[m] for m in ("qwen", "pythia", "mamba",
                                                                                       "rwkv")]
    assert len({(style.color, style.marker) for style in five.values()}) == len(five)


def test_collector_with_nothing_to_collect(tmp_path, capsys):
    assert collector.main(["--results_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "t")]) == 2
    assert "no runs" in capsys.readouterr().err


def test_dlc_needs_the_cluster_environment(tmp_path):
    (tmp_path / "configs").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "WORLD_SIZE", "NODE_RANK", "RANK")}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dlc",
                             "cuda:0,1", "10"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**env, "EXPERIMENT_DIR": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode != 0 and "dlc needs NNODES or WORLD_SIZE" in result.stderr


def test_collector_reports_an_unknown_schema_per_run_and_still_writes_the_tables(tmp_path):
    results = tmp_path / "results"
    for name, document in {"qwen_0.5B": completed("qwen", "0.5B", 494_032_768, 20.5, 30.2, 0.9, 150.0, 650.0),
                           "mamba_0.5B": {**completed("mamba", "0.5B", 1, 1, 1, 1, 1, 1), "schema_version": 2}
                           }.items():
        (results / name).mkdir(parents=True)
        (results / name / "efficientllm_metrics.json").write_text(json.dumps(document))
    frame = collector.collect([results], tmp_path / "tables").set_index("model")
    assert frame.loc["qwen", "status"] == "completed"
    assert frame.loc["mamba", "status"] == "corrupt" and "schema_version 2" in frame.loc["mamba", "reason"]
    assert "schema\\_version 2" in (tmp_path / "tables" / "attention_free_table.tex").read_text()


def test_a_fifth_family_registered_from_outside_runs_generate_train_collect(tmp_path, tokenizer_file, corpus_file):
    """The README's "Adding an architecture", followed for a family that lives in tests/ alone."""
    data_root = tmp_path / "data"
    prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, val_fraction=0.2, workers=1,
                          output_dir=str(data_root / Path(tokenizer_file).parent.name)))
    experiment = tmp_path / "experiment"
    env = {**os.environ, "EFFICIENTLLM_FAMILY_MODULES": "toy=toy_family", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    generated = subprocess.run(
        [sys.executable, "-m", "training_harness.sweep", "generate", "--models", "toy,mamba", "--sizes", "0.5B",
         "--preset", "tiny", "--seq_len", "32", "--micro_batch_size", "2", "--data_root", str(data_root),
         "--output_dir", str(experiment / "configs"), "--shared_tokenizer", tokenizer_file],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert generated.returncode == 0, generated.stderr
    # The protocol's 250 steps of 8 windows overrun the test corpus: said before anything runs ...
    assert "WARNING: toy 0.5B: 250 steps need 64,000 training tokens" in generated.stderr
    driver = subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dsw", "cpu",
                             "3"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**env, "EXPERIMENT_DIR": str(experiment), "EXTRA_ARGS": "--eval_windows 2"})
    assert driver.returncode == 0, driver.stdout + driver.stderr
    # The driver's 3 steps fit; the run's banner says what it reads and warns of its 2 validation windows.
    log = (experiment / "logs" / "toy_0.5B.log").read_text()
    assert "3 steps = 768 training tokens" in log and "WARNING: validation on 2 windows" in log
    data = json.loads((experiment / "results" / "toy_0.5B" / "config.json").read_text())["data"]
    assert data["training_passes"] == pytest.approx(3 * 8 * 32 / data["train_tokens"], rel=1e-3)
    collected = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_attention_free_results.py"),
                                "--results_dir", str(experiment / "results"), "--output_dir",
                                str(experiment / "tables")], capture_output=True, text=True, env=env, timeout=120)
    assert collected.returncode == 0, collected.stderr
    table = pd.read_csv(experiment / "tables" / "attention_free_results.csv").set_index("model")
    assert table.loc["toy", "status"] == "completed" and table.loc["toy", "display_name"] == "Toy shift"
    vocab_rows = 384  # the test tokenizer's vocabulary (conftest), already a multiple of 64
    assert table.loc["toy", "params"] == vocab_rows * 32 + 2 * (2 * 32 + 2 * 32 * 32 + 32) + 2 * 32
    report = (experiment / "tables" / "attention_free_report.txt").read_text()
    assert "Toy shift" in report and "(not in the study)" in report and "Mamba" in report
    assert "Toy shift" in (experiment / "tables" / "attention_free_table.tex").read_text()


def test_driver_help_exits_zero_with_the_header_and_synopsis():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stderr == ""
    assert "dsw, one node" in result.stdout and "usage: " in result.stdout and "set -euo" not in result.stdout


@pytest.mark.parametrize("wrapper", ["prepare_fineweb_dataset.sh", "generate_attention_free_configs.sh"])
def test_a_wrapper_scripts_help_names_the_wrapper_and_shows_defaults(wrapper):
    script = str(ROOT / "scripts" / wrapper)
    result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0 and result.stdout.split()[:2] == ["usage:", script]
    assert "(default: " in result.stdout


def undescribed_options(help_text: str) -> list[str]:
    """Options of an argparse --help text that have no description."""
    lines = help_text.splitlines()
    missing = []
    for index, line in enumerate(lines):
        if not line.startswith("  -") or line.startswith("  -h, --help"):
            continue
        described_here = len(line.strip().split("  ")) > 1
        described_below = index + 1 < len(lines) and lines[index + 1].startswith(" " * 10)
        if not (described_here or described_below):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_python_script_has_help_naming_it_and_describing_every_option(script):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}")
    assert undescribed_options(result.stdout) == []


def test_a_run_that_died_without_results_is_recorded_with_its_logs_last_exception(tmp_path):
    from training_harness.sweep import record_crash

    log = tmp_path / "pythia_0.5B.log"
    log.write_text("Traceback (most recent call last):\n  File \"run.py\", line 67, in next_rendezvous\n"
                   "torch.distributed.DistNetworkError: The server socket has failed to listen: address already "
                   "in use\n[2026-11-28 18:59:44] ERROR failed (exitcode: 1)\n")
    error = record_crash(tmp_path / "pythia_0.5B", "pythia_0.5B", 1, str(log))
    assert error.startswith("process exited with code 1 without results: torch.distributed.DistNetworkError: ")
    assert "address already in use" in error and error.endswith(f"see {log}")
    assert json.loads((tmp_path / "pythia_0.5B" / "efficientllm_metrics.json").read_text())["error"] == error
    assert record_crash(tmp_path / "pythia_0.5B", "pythia_0.5B", 1, str(log)) == error  # recorded once, read back
    relayed = tmp_path / "qwen_0.5B.log"  # torchrun prefixes a worker's lines with its rank
    relayed.write_text("[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert record_crash(tmp_path / "qwen_0.5B", "qwen_0.5B", 1, str(relayed)).startswith(
        "process exited with code 1 without results: torch.OutOfMemoryError: CUDA out of memory.")
    without_log = record_crash(tmp_path / "mamba_0.5B", "mamba_0.5B", 139, str(tmp_path / "no-such.log"))
    assert without_log == f"process exited with code 139 without results; see {tmp_path / 'no-such.log'}"


def test_a_crashed_run_of_a_family_whose_name_holds_an_underscore_is_recorded_as_that_family(tmp_path):
    from training_harness.sweep import record_crash

    record_crash(tmp_path / "gated_deltanet_1.5B", "gated_deltanet_1.5B", 139, "logs/gated_deltanet_1.5B.log")
    results = json.loads((tmp_path / "gated_deltanet_1.5B" / "efficientllm_metrics.json").read_text())
    assert (results["model"], results["size"], results["status"]) == ("gated_deltanet", "1.5B", "failed")
    frame = collector.collect([tmp_path], tmp_path / "tables")
    assert frame.loc[0, "display_name"] == "Gated DeltaNet" and frame.loc[0, "size"] == "1.5B"
