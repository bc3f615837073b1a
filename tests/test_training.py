"""The harness end to end on CPU: each script, resume, failures, configs, and a 2-process gloo run."""

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from processes import abort_with_stacks

from training_harness import distributed, kernel_warmup, lm, profiling
from training_harness import trainer as trainer_module
from training_harness.cli import main
from training_harness.config import TrainConfig, parse_config
from training_harness.errors import EXIT_INTERRUPTED, EXIT_NAN, EXIT_OOM, ConfigError
from training_harness.run_log import LOG_FILE, RunLog, read_log
from training_harness.trainer import checkpointed_blocks

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "2", "--micro_batch_size", "1", "--device", "cpu",
        "--eval_windows", "4", "--sample_interval_s", "0.02"]


def read_results(output: Path) -> dict:
    return json.loads((output / "efficientllm_metrics.json").read_text())


def step_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [record for record in records if "loss" in record]


def losses(output: Path) -> list[float]:
    return [record["loss"] for record in step_records(output)]


@pytest.mark.parametrize("family", ["qwen", "pythia", "mamba", "rwkv", "mamba2", "gated_deltanet"])
def test_script_runs_ten_steps_and_writes_every_output(family, data_dir, tmp_path):
    output = tmp_path / "run"
    script = ROOT / family / f"train_{family}_fineweb.py"
    result = subprocess.run([sys.executable, str(script), "--model_size", "0.5B", "--data_path", data_dir,
                             "--output_dir", str(output), "--max_steps", "10", *TINY],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # not a terminal: plain progress lines instead of a bar
    assert [line.split(":")[0] for line in lines if "/10: loss" in line] == [
        f"[{family} 0.5B] step {step}/10" for step in range(1, 11)]
    assert lines[-1] == f"completed: results in {output / 'efficientllm_metrics.json'}"
    results = read_results(output)
    assert results["status"] == "completed" and results["steps"] == 10 and results["model"] == family
    assert results["tokens"] == (10 - 3) * 2 * 32  # warm-up: 3 iterations
    assert results["al_s_per_iter"] > 0 and results["amu_gb"] > 0 and results["tt_tokens_per_param_s"] > 0
    assert results["ppl"] > 1 and results["bpb"] > 0
    assert results["aec_w"] is None and results["provenance"]["methods"]["aec_w"]
    assert len(losses(output)) == 10
    config = json.loads((output / "config.json").read_text())
    assert config["accumulation_steps"] == 2 and config["kernel_path"] == results["kernel_path"]
    assert (output / "checkpoint" / "model.safetensors").stat().st_size > 0
    assert (output / "efficientllm_timeline.csv").read_text().startswith("time_s,rank,gpu,field,value")
    assert any((output / "tensorboard").iterdir())


def run_in_process(data_dir, output, *extra):
    return main("qwen", ["--data_path", data_dir, "--output_dir", str(output), *TINY, *extra])


TWO_PROCESS_DEADLINE_S = 300


def run_two_processes(family: str, data_dir, output, *extra, env=None) -> subprocess.CompletedProcess:
    """The family's training script under torchrun, two processes on the CPU with tiny shapes. Past the deadline
    the test fails with where torchrun and its workers waited: their states and every Python thread's stack."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / family / f"train_{family}_fineweb.py"), "--data_path", data_dir, "--output_dir", str(output),
               *TINY, *extra]
    env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as run:
        try:
            stdout, stderr = run.communicate(timeout=TWO_PROCESS_DEADLINE_S)
        except subprocess.TimeoutExpired:
            waiting = abort_with_stacks(output)
            try:
                stdout, stderr = run.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                run.kill()
                stdout, stderr = run.communicate()
            pytest.fail(f"torchrun ran past {TWO_PROCESS_DEADLINE_S} s; its processes then:\n{waiting}\n"
                        f"its stderr, with their stacks:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def test_the_first_step_says_what_it_spent_compiling_triton_kernels(data_dir, tmp_path, monkeypatch, capsys):
    """A library kernel compiled at the first step (here through a stand-in for Triton's listener) is logged
    with that step, said on stderr, and no later step repeats it; the listener is given back at the end."""
    compilation = types.SimpleNamespace(listener=None)
    monkeypatch.setattr(profiling, "triton_compilation_knobs", lambda: compilation)
    train_step = trainer_module.Trainer.train_step

    def compiling_step(self):
        if self.step == 0:
            compilation.listener(src=None, metadata={"name": "chunk_h"}, metadata_group={},
                                 times=types.SimpleNamespace(total=2_500_000), cache_hit=False)
        return train_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", compiling_step)
    output = tmp_path / "run"
    assert run_in_process(data_dir, output, "--max_steps", "3") == 0
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert (steps[0]["triton_compilations"], steps[0]["triton_compile_s"]) == (1, 2.5)
    assert steps[0]["triton_compiled_kernels"] == {"chunk_h": 2.5}
    assert all("triton_compilations" not in r for r in steps[1:])
    assert "2.5 s of it compiling Triton kernels in this process: 1" in capsys.readouterr().err
    assert compilation.listener is None


def test_a_step_record_keeps_its_text_in_the_log_and_gives_tensorboard_its_numbers(tmp_path):
    """A first step whose kernel warm-up helper failed records why, as text: TensorBoard takes numbers only,
    and the text must not stop the run at its first step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, "run", is_main=True)
    log.open(first_step=0, total_steps=1)
    record = {"step": 1, "loss": 2.5, "step_s": 0.5, "tokens_per_s": 100.0,
              "kernel_warmup_error": "exit 1: ValueError (see kernel_warmup.log)"}
    log.step(record, {"power_w": 300.0})
    log.close()
    assert read_log(tmp_path / LOG_FILE) == [record]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["device/power_w", "train/loss", "train/step_s", "train/tokens_per_s"]


def test_the_first_steps_objects_are_frozen_out_of_the_collectors_passes_until_the_end(data_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """From the second step on, what the first left (compiled graphs and the like) is out of the garbage
    collector's full passes; at the end of the steps it is collectable again."""
    seen, train_step = [], trainer_module.Trainer.train_step

    def observed_step(self):
        seen.append(gc.get_freeze_count())
        return train_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", observed_step)
    assert run_in_process(data_dir, tmp_path / "run", "--max_steps", "3") == 0
    assert seen[0] == 0 and 0 < seen[2] <= seen[1]  # frozen once; some of those objects since freed
    said = re.search(r"([\d,]+) objects from the first step frozen out of the garbage collector's passes",
                     capsys.readouterr().err)
    assert said and int(said[1].replace(",", "")) >= seen[1]
    assert gc.get_freeze_count() == 0


def test_the_first_step_waits_for_the_kernel_warmup_helper_and_records_it(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernel_warmup, "wanted", lambda config, family, context: True)  # as on CUDA
    output = tmp_path / "run"
    assert run_in_process(data_dir, output, "--max_steps", "3") == 0
    steps = [r for r in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[0]["kernel_warmup_wait_s"] >= 0
    assert all("kernel_warmup_wait_s" not in r for r in steps[1:])
    assert "a helper process compiles the library's kernels meanwhile" in capsys.readouterr().err
    assert "qwen 0.5B, 2 blocks, micro-batch 1 x 32 tokens" in (output / kernel_warmup.LOG_NAME).read_text()


def test_interrupt_then_resume_continues_the_same_loss_curve(data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert run_in_process(data_dir, straight, "--max_steps", "8") == 0

    original = trainer_module.Trainer.train_step

    def signal_at_step_five(self):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal: the handler stops at the next boundary
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", signal_at_step_five)
    resumed = tmp_path / "resumed"
    assert run_in_process(data_dir, resumed, "--max_steps", "8") == EXIT_INTERRUPTED
    assert read_results(resumed)["status"] == "interrupted" and read_results(resumed)["steps"] == 5
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    assert run_in_process(data_dir, resumed, "--max_steps", "8", "--resume") == 0
    assert read_results(resumed)["status"] == "completed" and read_results(resumed)["steps"] == 8
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    # A completed run is not run again.
    assert run_in_process(data_dir, resumed, "--max_steps", "8", "--resume") == 0
    assert len(losses(resumed)) == 8


def test_a_signal_while_the_run_builds_stops_it_before_its_first_step(data_dir, tmp_path, monkeypatch):
    original = trainer_module.Trainer.setup

    def setup_then_signal(self):
        description = original(self)
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, before any step
        return description

    monkeypatch.setattr(trainer_module.Trainer, "setup", setup_then_signal)
    output = tmp_path / "run"
    assert run_in_process(data_dir, output, "--max_steps", "8") == EXIT_INTERRUPTED
    assert read_results(output)["status"] == "interrupted" and read_results(output)["steps"] == 0


def test_a_second_signal_kills_even_where_the_process_started_ignoring_sigint():
    """A shell's background job (as the sweep driver starts runs) inherits SIGINT ignored: after the first
    signal asks for a stop, the second must not be ignored as the inherited handler would have it."""
    outside = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with trainer_module.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_name == "SIGINT" and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # as it was before the run
    finally:
        signal.signal(signal.SIGINT, outside)


def test_checkpoints_hold_the_float32_masters_of_the_working_weights(data_dir, tmp_path, capsys):
    """With --working_weights a run trains on bf16 copies of the matrix weights; what it saves is the masters."""
    from safetensors.torch import load_file

    assert run_in_process(data_dir, tmp_path, "--max_steps", "3", "--working_weights") == 0
    assert "bf16-mixed (bf16 working weights), micro-batch 1" in capsys.readouterr().err  # the banner
    weights = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    projection = weights["backbone.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(projection, projection.bfloat16().float())  # not a bf16 copy saved as float32


def test_a_run_with_working_weights_resumes_on_its_masters_as_if_never_stopped(data_dir, tmp_path, monkeypatch):
    """A checkpoint of bf16 copies instead of the float32 masters would change the steps after the resume."""
    flags = ("--max_steps", "4", "--working_weights")
    assert run_in_process(data_dir, tmp_path / "straight", *flags) == 0
    original = trainer_module.Trainer.train_step

    def signal_at_step_two(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", signal_at_step_two)
    assert run_in_process(data_dir, tmp_path / "resumed", *flags) == EXIT_INTERRUPTED
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    assert run_in_process(data_dir, tmp_path / "resumed", *flags, "--resume") == 0
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_out_of_memory_is_recorded(data_dir, tmp_path, monkeypatch):
    original = trainer_module.Trainer.train_step

    def oom_at_step_three(self):
        if self.step == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", oom_at_step_three)
    output = tmp_path / "oom"
    assert run_in_process(data_dir, output, "--max_steps", "10") == EXIT_OOM
    results = read_results(output)
    assert results["status"] == "oom" and "Tried to allocate" in results["error"] and results["steps"] == 3
    assert results["ppl"] is None


def test_automatic_micro_batch_halves_until_the_first_step_fits(data_dir, tmp_path, monkeypatch):
    original = trainer_module.Trainer.train_step

    def oom_above_two_sequences(self):
        if self.micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", oom_above_two_sequences)
    automatic = [a for a in TINY if a not in ("--micro_batch_size", "1", "--batch_size", "2")]
    halved = tmp_path / "halved"
    assert main("qwen", ["--data_path", data_dir, "--output_dir", str(halved), *automatic, "--batch_size", "8",
                         "--max_steps", "4"]) == 0
    results = read_results(halved)
    assert (results["micro_batch_size"], results["accumulation_steps"]) == (2, 4)
    assert results["tokens"] == (4 - 3) * 8 * 32  # the failed attempts add nothing
    explicit = tmp_path / "explicit"
    assert main("qwen", ["--data_path", data_dir, "--output_dir", str(explicit), *automatic, "--batch_size", "8",
                         "--micro_batch_size", "2", "--max_steps", "4"]) == 0
    assert losses(halved) == losses(explicit)  # the same windows, the same arithmetic


def test_non_finite_loss_stops_the_run(data_dir, tmp_path, monkeypatch):
    original = trainer_module.Trainer.train_step

    def nan_at_step_two(self):
        loss_sum, grad_norm = original(self)
        return (loss_sum * float("nan") if self.step == 2 else loss_sum), grad_norm

    monkeypatch.setattr(trainer_module.Trainer, "train_step", nan_at_step_two)
    output = tmp_path / "nan"
    assert run_in_process(data_dir, output, "--max_steps", "10") == EXIT_NAN
    results = read_results(output)
    assert results["status"] == "nan" and "at step 3" in results["error"]


def test_two_process_gloo_run_combines_ranks_and_runs_a_plans_cuda_graphs_flag_without_graphs(data_dir, tmp_path):
    output = tmp_path / "ddp"
    result = run_two_processes("pythia", data_dir, output, "--max_steps", "6", "--cuda_graphs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING: --cuda_graphs captures one process's step; these 2 processes run without graphs" in result.stderr
    results = read_results(output)
    assert results["world_size"] == 2 and results["provenance"]["world_size"] == 2
    assert results["cuda_graphs"] is False
    # Global batch 2 over 2 ranks: one sequence each per step; tokens are the sum over ranks.
    assert results["tokens"] == (6 - 3) * 2 * 32
    assert (output / "efficientllm_timeline_rank1.csv").exists()


def test_several_processes_run_a_plans_working_weights_flag_under_autocasts_casts(data_dir, tmp_path):
    result = run_two_processes("mamba", data_dir, tmp_path / "ddp", "--max_steps", "2", "--working_weights")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING: --working_weights is off for this run: these 2 processes would reduce bf16 gradients" \
        in result.stderr


def test_a_plans_working_weights_flag_is_off_where_there_are_no_float32_masters(data_dir, tmp_path, capsys):
    assert run_in_process(data_dir, tmp_path, "--max_steps", "1", "--working_weights", "--precision", "bf16") == 0
    banner = capsys.readouterr().err
    assert "WARNING: --working_weights is off for this run: --precision bf16 has no float32 master" in banner
    assert "bf16 working weights" not in banner
    assert json.loads((tmp_path / "config.json").read_text())["config"]["working_weights"] is False


def test_a_fault_in_a_finished_ranks_interpreter_teardown_costs_nothing(data_dir, tmp_path):
    """A torchrun process whose results are written leaves without the interpreter's teardown, in which
    finished ranks have aborted (docs/reliability.md): here every worker is made to abort there."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("import atexit, os\n\nif 'RANK' in os.environ:\n"
                                            "    atexit.register(os.abort)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    output = tmp_path / "run"
    result = run_two_processes("pythia", data_dir, output, "--max_steps", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_results(output)["status"] == "completed"


def test_config_file_and_flags(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"model": "rwkv", "model_size": "1.5B", "data_path": "d", "output_dir": "o",
                                       "max_steps": 50, "lr": 3e-4}))
    config = parse_config(["--config", str(config_file), "--max_steps", "7"], "rwkv", "")
    assert (config.max_steps, config.lr, config.model_size, config.global_batch) == (7, 3e-4, "1.5B", 4)
    assert config.batch_plan(world_size=1) == (4, 1)
    with pytest.raises(ConfigError, match="trains qwen"):
        parse_config(["--config", str(config_file)], "qwen", "")
    config_file.write_text(json.dumps({"data_path": "d", "output_dir": "o", "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config(["--config", str(config_file)], "rwkv", "")
    with pytest.raises(ConfigError, match="not a multiple"):
        parse_config(["--data_path", "d", "--output_dir", "o", "--batch_size", "8", "--micro_batch_size", "3"],
                     "qwen", "").batch_plan(1)
    with pytest.raises(ConfigError, match="precision"):
        parse_config(["--data_path", "d", "--output_dir", "o", "--precision", "fp16"], "qwen", "")


def test_raw_jsonl_is_prepared_on_the_fly(tmp_path, corpus_file, tokenizer_file):
    env = {**os.environ, "EFFICIENTLLM_CACHE": str(tmp_path / "cache")}
    output = tmp_path / "debug_output"
    result = subprocess.run([sys.executable, str(ROOT / "mamba" / "train_mamba_fineweb.py"), "--model_size", "0.5B",
                             "--data_path", str(corpus_file), "--tokenizer", tokenizer_file, "--val_fraction", "0.2",
                             "--output_dir", str(output), "--max_steps", "4", *TINY],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert read_results(output)["status"] == "completed"
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 1


def test_bad_data_path_is_a_one_line_error(tmp_path, capsys):
    assert main("qwen", ["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "missing" in err[-1]


def test_activation_checkpointing_leaves_the_loss_curve_unchanged(data_dir, tmp_path):
    assert run_in_process(data_dir, tmp_path / "plain", "--max_steps", "3") == 0
    assert run_in_process(data_dir, tmp_path / "ckpt", "--max_steps", "3", "--activation_checkpointing") == 0
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    assert run_in_process(data_dir, tmp_path / "part", "--max_steps", "3", "--activation_checkpointing",
                          "--checkpoint_blocks", "1") == 0
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    assert read_results(tmp_path / "part")["checkpoint_blocks"] == 1


def test_the_loss_chunk_flag_reaches_the_loss_and_leaves_the_loss_curve_unchanged(data_dir, tmp_path, monkeypatch):
    chunks, loss = [], lm.linear_cross_entropy

    def recording(hidden, weight, labels, chunk_tokens, loss_and_grad):
        chunks.append(chunk_tokens)
        return loss(hidden, weight, labels, chunk_tokens, loss_and_grad)

    monkeypatch.setattr(lm, "linear_cross_entropy", recording)
    assert run_in_process(data_dir, tmp_path / "default", "--max_steps", "3") == 0
    assert set(chunks) == {lm.LOSS_CHUNK_TOKENS}
    chunks.clear()
    assert run_in_process(data_dir, tmp_path / "small", "--max_steps", "3", "--loss_chunk_tokens", "7") == 0
    assert set(chunks) == {7}
    assert losses(tmp_path / "small") == pytest.approx(losses(tmp_path / "default"), rel=1e-5)
    with pytest.raises(ConfigError, match="loss_chunk_tokens must be positive"):
        TrainConfig(loss_chunk_tokens=0)


def test_checkpoint_blocks_picks_the_first_blocks_and_refuses_too_many():
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    config = TrainConfig(activation_checkpointing=True, checkpoint_blocks=3)
    assert checkpointed_blocks(blocks, config) == set(blocks[:3])
    assert checkpointed_blocks(blocks, TrainConfig(activation_checkpointing=True)) == set(blocks)
    with pytest.raises(ConfigError, match="exceeds the model's 4 blocks"):
        checkpointed_blocks(blocks, TrainConfig(activation_checkpointing=True, checkpoint_blocks=5))
    with pytest.raises(ConfigError, match="needs --activation_checkpointing"):
        TrainConfig(checkpoint_blocks=2)


def test_compiled_blocks_and_loss_follow_the_eager_loss_curve(data_dir, tmp_path):
    assert run_in_process(data_dir, tmp_path / "eager", "--max_steps", "3") == 0
    assert run_in_process(data_dir, tmp_path / "compiled", "--max_steps", "3", "--compile") == 0
    compiled = read_results(tmp_path / "compiled")
    assert compiled["compile"] is True and compiled["cuda_graphs"] is False
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_compiled_regions_lower_their_backward_with_their_forward(data_dir, tmp_path):
    """The first backward compiles nothing: its lowering happened beside the forward's (change 21), where it
    overlaps the helper that compiles the library's kernels instead of following the wait for it."""
    torch._dynamo.reset()  # compiled frames of earlier tests would be reused, compiling nothing
    triggers = []
    record = torch._dynamo.callback_handler.register_start_callback(
        lambda args: triggers.append(args.callback_trigger.name))
    # torch's own patch, not monkeypatch: restoring a config by deleting it hides it from every later reader
    try:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=False):  # torch's default
            assert run_in_process(data_dir, tmp_path / "run", "--max_steps", "1", "--compile") == 0
    finally:
        torch._dynamo.callback_handler.remove_start_callback(record)
    assert "DYNAMO" in triggers and "LAZY_BACKWARD" not in triggers


def test_gpu_runs_use_expandable_allocator_segments_unless_the_user_chose_settings(data_dir, tmp_path, monkeypatch):
    for name in distributed.ALLOCATOR_VARIABLES:
        monkeypatch.setenv(name, "")  # unset, and restored after the test
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # as in a fresh process, on a GPU too
    assert run_in_process(data_dir, tmp_path / "cpu", "--max_steps", "1") == 0
    assert not os.environ["PYTORCH_CUDA_ALLOC_CONF"]  # --device cpu: no CUDA allocator to set
    assert run_in_process(data_dir, tmp_path / "default", "--max_steps", "1", "--device", "") == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == distributed.ALLOCATOR_SETTINGS == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")
    assert run_in_process(data_dir, tmp_path / "chosen", "--max_steps", "1") == 0
    assert not os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    recorded = {run: json.loads((tmp_path / run / "config.json").read_text())["versions"]["cuda_allocator"]
                for run in ("cpu", "default", "chosen")}
    assert recorded == {"cpu": None, "default": "expandable_segments:True",
                        "chosen": "garbage_collection_threshold:0.8"}


def test_activation_memory_budget_holds_inside_the_compute_context_only_and_needs_compile():
    before = torch._functorch.config.activation_memory_budget
    with trainer_module.compute_context(TrainConfig(compile=True, activation_memory_budget=0.6), torch.device("cpu")):
        assert torch._functorch.config.activation_memory_budget == 0.6
    assert torch._functorch.config.activation_memory_budget == before
    with pytest.raises(ConfigError, match="needs --compile"):
        TrainConfig(activation_memory_budget=0.6)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        TrainConfig(compile=True, activation_memory_budget=0)


def test_keep_recurrence_terms_is_refused_for_a_family_without_that_recurrence(data_dir, tmp_path, capsys):
    assert run_in_process(data_dir, tmp_path / "run", "--max_steps", "1", "--keep_recurrence_terms") == 2
    assert "--keep_recurrence_terms is for RWKV-7's recurrence; Qwen2.5 has none to keep" in capsys.readouterr().err


def test_cuda_graphs_are_refused_where_they_cannot_run(data_dir, tmp_path, capsys):
    assert run_in_process(data_dir, tmp_path / "run", "--max_steps", "2", "--cuda_graphs") == 2
    assert "--cuda_graphs captures CUDA work; drop it on cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("family", "flags"), [
    ("qwen", []), ("mamba2", ["--compile"]), ("pythia", ["--compile", "--attention", "cudnn"]),  # 0.5B's plan
    # as the 3B plans that replay graphs run: compiled, some blocks recomputed
    *[(family, ["--compile", "--activation_checkpointing", "--checkpoint_blocks", "1"])
      for family in ("qwen", "rwkv", "gated_deltanet")],
    # working weights: their float32 sums made by the capture; Mamba's backward adds its products into them
    *[(family, ["--compile", "--working_weights"]) for family in ("qwen", "mamba", "rwkv")]])
def test_cuda_graph_steps_train_as_the_plain_steps_do(family, flags, data_dir, tmp_path):
    """Two micro-batches per step, a large learning rate: a gradient lost or counted twice across the
    micro-batches or the steps (the capture's own gradients or gradient sums), or a recomputed block that
    differs from its forward pass, would change the gradient norm and the losses."""
    if family == "gated_deltanet":
        from gated_deltanet import delta_rule

        if delta_rule.fused_kernels_available() and (refused := delta_rule.backward_refused()):
            pytest.skip(refused)
    common = ["--data_path", data_dir, "--preset", "tiny", "--seq_len", "32", "--batch_size", "4",
              "--micro_batch_size", "2", "--device", "cuda", "--max_steps", "6", "--lr", "1e-2", "--eval_windows",
              "2", "--sample_interval_s", "0.02", "--no-final_checkpoint", *flags]
    assert main(family, [*common, "--output_dir", str(tmp_path / "plain")]) == 0
    assert main(family, [*common, "--output_dir", str(tmp_path / "graphs"), "--cuda_graphs"]) == 0
    plain, graphed = step_records(tmp_path / "plain"), step_records(tmp_path / "graphs")
    assert len(graphed) == 6
    assert [r["grad_norm"] for r in graphed] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-3)
    assert [r["loss"] for r in graphed] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    results = read_results(tmp_path / "graphs")
    assert results["cuda_graphs"] is True
    assert results["ppl"] == pytest.approx(read_results(tmp_path / "plain")["ppl"], rel=1e-3)
    config = json.loads((tmp_path / "graphs" / "config.json").read_text())["config"]
    assert config["working_weights"] is ("--working_weights" in flags)


def test_compiled_rwkv_regions_run_cold_and_from_a_warm_compile_cache(data_dir, tmp_path):
    """RWKV-7 compiles two graphs around its recurrence; their per-head view outputs once came back from
    a warm compile cache with garbage shapes."""
    script = ROOT / "rwkv" / "train_rwkv_fineweb.py"
    common = ["--data_path", data_dir, *TINY, "--max_steps", "3"]
    assert main("rwkv", [*common, "--output_dir", str(tmp_path / "eager")]) == 0
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    for cache in ("cold", "warm"):
        result = subprocess.run([sys.executable, str(script), *common, "--output_dir", str(tmp_path / cache),
                                 "--compile"], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert losses(tmp_path / cache) == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_compiled_runs_in_one_process_each_compile_their_own_regions(data_dir, tmp_path):
    """Frames compiled by an earlier run in the process do not count against the next run's recompile limit:
    RWKV-7's two fullgraph regions compile four variants a run (first block or not, training or evaluation),
    and bf16 working weights four others, which would fail past a limit of four."""
    common = ["--data_path", data_dir, *TINY, "--max_steps", "1", "--compile"]
    with torch._dynamo.config.patch(recompile_limit=4):
        assert main("rwkv", [*common, "--output_dir", str(tmp_path / "master")]) == 0
        assert main("rwkv", [*common, "--output_dir", str(tmp_path / "working"), "--working_weights"]) == 0


def test_compiled_run_never_pickles_into_the_autograd_cache(data_dir, tmp_path, monkeypatch):
    """Saving a compiled backward to AOTAutograd's cache intermittently died with SIGSEGV inside pickle.dumps
    on a first (empty-cache) run; the harness turns that cache off, so nothing may be saved to it."""
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))  # empty: a save would follow
    saved = []
    monkeypatch.setattr(AOTAutogradCache, "save", staticmethod(lambda key, *args, **kwargs: saved.append(key)))
    with torch._functorch.config.patch(enable_autograd_cache=True):  # torch's default, restored after
        assert main("rwkv", ["--data_path", data_dir, *TINY, "--max_steps", "1", "--output_dir",
                             str(tmp_path / "run"), "--compile"]) == 0
    assert saved == []


@pytest.mark.parametrize("family", ["rwkv", "mamba"])  # blocks that pass a tensor on to later blocks
def test_two_process_fsdp2_run_trains_as_one_process_does(family, data_dir, tmp_path):
    """The same global batch sharded over two processes: the same logged losses (the global batch's, not
    rank 0's half) and gradient norms as one process accumulating it, and no warning from FSDP2."""
    output = tmp_path / "fsdp"
    result = run_two_processes(family, data_dir, output, "--max_steps", "4", "--fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UserWarning" not in result.stderr
    results = read_results(output)
    assert results["status"] == "completed" and results["world_size"] == 2 and results["ppl"] > 1
    assert (output / "checkpoint" / "model.safetensors").stat().st_size > 0
    assert main(family, ["--data_path", data_dir, "--output_dir", str(tmp_path / "one"), *TINY,
                         "--max_steps", "4"]) == 0
    sharded, single = step_records(output), step_records(tmp_path / "one")
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in single], rel=1e-3)  # bf16 autocast
    assert [r["grad_norm"] for r in sharded] == pytest.approx([r["grad_norm"] for r in single], rel=1e-3)


def test_periodic_evaluation_is_logged_and_kept_out_of_the_window(data_dir, tmp_path):
    output = tmp_path / "evals"
    assert run_in_process(data_dir, output, "--max_steps", "8", "--eval_interval", "3",
                          "--checkpoint_interval", "4") == 0
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6, 8]  # periodic, then the final one
    results = read_results(output)
    assert results["provenance"]["measured_iterations"] == 8 - 3
    assert results["tokens"] == (8 - 3) * 2 * 32


def test_the_commit_is_recorded_in_a_checkout_and_from_the_environment_outside_one(tmp_path, monkeypatch):
    from training_harness import run_description

    in_checkout = run_description.git_state()
    assert len(in_checkout["commit"]) == 40 and isinstance(in_checkout["dirty"], bool)
    monkeypatch.setattr(run_description, "_CHECKOUT", tmp_path)  # a copy without .git
    monkeypatch.delenv(run_description.SOURCE_COMMIT_VARIABLE, raising=False)
    assert run_description.git_state()["commit"] is None
    monkeypatch.setenv(run_description.SOURCE_COMMIT_VARIABLE, "abc123")
    assert run_description.git_state() == {
        "commit": "abc123", "dirty": None, "reason": "not a git checkout; the commit is EFFICIENTLLM_SOURCE_COMMIT's"}


def test_a_budget_beyond_the_training_split_is_said_before_the_first_step(data_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_in_process(data_dir, output, "--max_steps", "2", "--batch_size", "64", "--micro_batch_size", "64") == 0
    said = capsys.readouterr().err
    data = json.loads((output / "config.json").read_text())["data"]
    assert data["training_tokens"] == 2 * 64 * 32 and data["training_passes"] > 1
    warning = said.index(f"WARNING: the budget is {data['training_passes']:.2f} passes over the training split")
    assert warning < said.index("step 1/2")


def test_offline_a_hub_tokenizer_fails_in_seconds_with_one_line(corpus_file, tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "pythia" / "train_pythia_fineweb.py"), "--data_path",
                             str(corpus_file), "--tokenizer", "no-such-org/no-such-tokenizer", "--output_dir",
                             str(tmp_path / "run"), *TINY], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert result.stderr.strip().splitlines()[-1] == (
        "error: tokenizer 'no-such-org/no-such-tokenizer' is not in the local cache and the Hugging Face hub cannot "
        "be reached; pass --tokenizer a local folder or tokenizer.json")


def test_with_no_data_path_a_run_trains_on_the_bundled_corpus_without_a_download(tmp_path):
    """README's debug command, as printed, on a machine with no network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EFFICIENTLLM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "pythia" / "train_pythia_fineweb.py"), "--preset", "tiny",
                             "--seq_len", "256", "--output_dir", str(tmp_path / "run"), "--max_steps", "3"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "no --data_path: the bundled 28-document corpus" in result.stderr
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["source"].endswith("default_corpus.jsonl") and "bundled-" in data["tokenizer"]
    assert read_results(tmp_path / "run")["bpb"] > 0
