"""The training loop every script shares: build, train under the monitor, validate, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from efficientllm_metrics import (
    Monitor,
    ResultsError,
    RunHeader,
    Validation,
    read_results,
    write_json_atomic,
)
from training_harness import checkpoint, distributed, kernel_warmup
from training_harness.config import TrainConfig
from training_harness.cuda_graphs import Batch, GraphedStep
from training_harness.data import TokenWindows, resolve_data_path
from training_harness.errors import EXIT_INTERRUPTED, ConfigError, DataError
from training_harness.lm import no_weight_decay, parameter_count
from training_harness.profiling import TritonCompileLog
from training_harness.registry import build_model, get_family
from training_harness.run_description import CONFIG_FILE, RunDescription, git_state, versions
from training_harness.run_log import LOG_FILE, RunLog
from training_harness.tokenization import bundled_tokenizer, default_corpus_path
from training_harness.working_weights import WorkingWeights, matrix_weights, working_weights_refusal

#: Held-out share of the bundled corpus when a run is given no --data_path.
BUNDLED_VAL_FRACTION = 0.25


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Outcome:
    status: str
    exit_code: int
    error: str | None = None
    details: dict = field(default_factory=dict)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second signal kills, even where the
    process was started ignoring SIGINT (a shell's background job, as the sweep driver starts runs)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_schedule(config: TrainConfig):
    """Linear warm-up to ``lr``, then cosine decay to ``lr x min_lr_ratio`` at ``max_steps``."""
    warmup = config.lr_warmup_steps if config.lr_warmup_steps is not None else max(1, config.max_steps // 100)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if no_weight_decay(name, parameter) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def checkpointed_blocks(blocks: torch.nn.ModuleList, config: TrainConfig) -> set[torch.nn.Module]:
    """The blocks whose activations are recomputed in backward: the first ``checkpoint_blocks`` (all by
    default), as Megatron-LM's block method chooses them."""
    count = len(blocks) if config.checkpoint_blocks is None else config.checkpoint_blocks
    if count > len(blocks):
        raise ConfigError(f"--checkpoint_blocks {count} exceeds the model's {len(blocks)} blocks")
    return set(blocks[:count])


def recompute_blocks(model: torch.nn.Module, blocks: set[torch.nn.Module], cuda_graphs: bool) -> None:
    """Activation checkpointing of ``blocks``. Under --cuda_graphs without saving the RNG state for the
    recomputation: a capture cannot read it, and no family draws random numbers in its forward pass."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    wrapper = functools.partial(checkpoint_wrapper, preserve_rng_state=not cuda_graphs)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=blocks.__contains__)


def compute_context(config: TrainConfig, device: torch.device) -> contextlib.ExitStack:
    """bf16 autocast for bf16-mixed, the chosen attention kernel, and the compiled regions' activation budget
    (their forward and backward are split when the forward first runs, inside this context)."""
    stack = contextlib.ExitStack()
    if config.activation_memory_budget < 1:
        stack.enter_context(torch._functorch.config.patch(activation_memory_budget=config.activation_memory_budget))
    if config.precision == "bf16-mixed":
        # A CUDA graph cannot capture autocast's cache of cast weights; the casts are the same without it.
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not config.cuda_graphs)
        stack.enter_context(autocast)
    if config.attention != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[config.attention]
        stack.enter_context(sdpa_kernel(backend))
    return stack


@torch.no_grad()
def evaluate(model, windows: TokenWindows, config: TrainConfig, micro_batch: int, device) -> Validation:
    """Mean cross-entropy over the fixed validation windows (every rank evaluates the same ones)."""
    model.eval()
    loss_sum, tokens, utf8_bytes = 0.0, 0, 0.0
    for inputs, labels in windows.validation_batches(config.eval_windows, micro_batch):
        with compute_context(config, device):
            loss = model(inputs.to(device), labels.to(device))
        loss_sum += loss.item() * labels.numel()
        tokens += labels.numel()
        utf8_bytes += windows.utf8_bytes(labels)
    model.train()
    return Validation(loss_sum / tokens, tokens, utf8_bytes, windows.bytes_source)


class Trainer:
    """One run: ``setup()`` builds everything and returns the run's description; ``run()`` trains under the
    monitor and returns an Outcome; ``finish()`` validates and checkpoints a completed run."""

    def __init__(self, config: TrainConfig, context: distributed.ProcessContext):
        self.config = config
        self.context = context
        self.output = Path(config.output_dir)
        self.family = get_family(config.model)
        self.log = RunLog(self.output, f"{self.family.name} {config.model_size}", context.is_main)
        self.description: RunDescription | None = None
        self.validation: Validation | None = None
        self.step = 0
        self.kernel_warmup: kernel_warmup.KernelWarmup | None = None
        self.kernel_warmup_record: dict = {}
        self.graphed_step: GraphedStep | None = None
        self.working_weights: WorkingWeights | None = None
        self.first_step = 0  # of this process: the resumed step after --resume

    @property
    def micro_batch(self) -> int:
        return self.description.micro_batch_size

    @property
    def accumulation(self) -> int:
        return self.description.accumulation_steps

    # -------------------------------------------------------------------------------------------- setup
    def setup(self) -> RunDescription:
        config, context = self.config, self.context
        data_path, tokenizer, val_fraction = self._data_source()
        if context.is_main:  # one process prepares a raw file; the others wait and reuse it
            if Path(data_path).is_file():
                self.log.say(f"preparing {data_path} with tokenizer {tokenizer} (once; later runs reuse it)")
            data_dir = resolve_data_path(data_path, tokenizer, val_fraction)
        distributed.barrier(context)
        if not context.is_main:
            data_dir = resolve_data_path(data_path, tokenizer, val_fraction)
        self.train_windows = TokenWindows(data_dir, "train", config.seq_len)
        self.val_windows = TokenWindows(data_dir, "val", config.seq_len)
        meta = self.train_windows.meta
        micro_batch, accumulation = config.batch_plan(context.world_size)
        if config.cuda_graphs and context.world_size > 1:  # a plan's flag (Mamba-2 3B) in a sweep on several GPUs
            self.log.say(f"WARNING: --cuda_graphs captures one process's step; these {context.world_size} "
                         "processes run without graphs")
            self.config = config = dataclasses.replace(config, cuda_graphs=False)
        if config.working_weights and (why := working_weights_refusal(config, context.world_size)):
            self.log.say(f"WARNING: --working_weights is off for this run: {why}")
            self.config = config = dataclasses.replace(config, working_weights=False)
        if config.cuda_graphs and not context.cuda_indices:
            raise ConfigError(f"--cuda_graphs captures CUDA work; drop it on {context.device}")
        vocab_rows = self.family.vocab_rows(meta["vocab_size"], config.preset)
        if kernel_warmup.wanted(config, self.family, context):
            self.kernel_warmup = kernel_warmup.start(dataclasses.replace(config, device=str(context.device)),
                                                     micro_batch, vocab_rows, self.output)

        if config.attention != "auto" and not context.cuda_indices:
            raise ConfigError(f"--attention {config.attention} picks a CUDA kernel; use auto on {context.device}")
        self.log.say(f"building {self.family.display_name} {config.model_size} ({config.preset} shapes) "
                     f"on {context.device}")
        torch.manual_seed(config.seed)
        model = build_model(self.family, config.model_size, config.preset, vocab_rows, context.device,
                            config.allow_slow_kernels)
        shape = self.family.shape(config.model_size, config.preset)
        if config.keep_recurrence_terms:
            if not hasattr(model.backbone, "keep_recurrence_terms"):
                raise ConfigError(f"--keep_recurrence_terms is for RWKV-7's recurrence; {self.family.display_name} "
                                  "has none to keep")
            model.backbone.keep_recurrence_terms()
        if config.precision == "bf16":
            model = model.to(torch.bfloat16)
        model.loss_chunk_tokens = config.loss_chunk_tokens
        self.description = RunDescription(
            family=self.family.name, display_name=self.family.display_name, size=config.model_size,
            preset=config.preset, shape=shape, params=parameter_count(model), vocab_rows=vocab_rows,
            flops_per_token=self.family.flops_per_token(model, shape, config.seq_len),
            kernel_path=model.kernel_path, context=config.seq_len, global_batch=config.global_batch,
            micro_batch_size=micro_batch, accumulation_steps=accumulation, world_size=context.world_size,
            device=str(context.device),
            device_name=torch.cuda.get_device_name(context.device) if context.cuda_indices else "cpu",
            host=platform.node(),
            data=self._data_facts(data_dir), versions=versions(), git=git_state(), config=config.to_dict())
        self._banner()
        if config.compile:
            # A run's regions recompile for its own dtypes and flags; frames kept from an earlier run in this
            # process would count against dynamo's recompile limit, past which fullgraph regions fail and
            # the others silently run eagerly. Only the frames: a caller's dynamo callbacks stay.
            torch._dynamo.reset_code_caches()
            model.compile_regions()
        if config.activation_checkpointing:
            recompute_blocks(model, checkpointed_blocks(model.blocks, config), config.cuda_graphs)
        self.model = distributed.wrap(model, context, config.fsdp)
        if config.working_weights:
            self.working_weights = WorkingWeights(matrix_weights(model))
        self.optimizer = build_optimizer(self.model, config, context.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(config))
        if config.resume:
            with self._masters():
                self._resume()
        self.first_step = self.step
        if context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self.log.keep_until(self.step)
            write_json_atomic(self.output / CONFIG_FILE, self.description.as_dict())
        return self.description

    def _masters(self) -> contextlib.AbstractContextManager:
        """Where the parameters hold their float32 masters: around clipping, AdamW and checkpoints."""
        return contextlib.nullcontext() if self.working_weights is None else self.working_weights.masters()

    def _save_checkpoint(self, with_optimizer: bool) -> None:
        with self._masters():
            checkpoint.save(self.output, self.model, self.optimizer, self.scheduler, self.step, with_optimizer,
                            self.context.is_main)

    def _data_source(self) -> tuple[str, str, float]:
        """(data path, tokenizer, held-out share): the flags', or without --data_path the bundled corpus with a
        tokenizer trained on it and a quarter of its 28 documents held out (the default share holds out none)."""
        config = self.config
        if config.data_path:
            return config.data_path, config.tokenizer or self.family.default_tokenizer, config.val_fraction
        self.log.say("no --data_path: the bundled 28-document corpus and a tokenizer trained on it, a check that "
                     "the code runs (not a benchmark; pass --data_path for real data)")
        return str(default_corpus_path()), str(bundled_tokenizer()), BUNDLED_VAL_FRACTION

    def _data_facts(self, data_dir: Path) -> dict:
        """The prepared data and what this run takes from it: the training budget in passes over the
        training split (above 1, text repeats) and the validation windows."""
        config, meta = self.config, self.train_windows.meta
        budget, train_tokens = config.training_tokens, meta["splits"]["train"]["tokens"]
        return {
            "folder": str(data_dir), "source": meta.get("arguments", {}).get("source"),
            **{key: meta[key] for key in ("tokenizer", "vocab_size", "eos_id", "content_sha256")},
            "train_tokens": train_tokens, "val_tokens": meta["splits"]["val"]["tokens"],
            "training_tokens": budget, "training_passes": round(budget / train_tokens, 4),
            "validation_windows": self.val_windows.validation_count(config.eval_windows),
            "bpb_bytes": self.val_windows.bytes_source,
        }

    def _banner(self) -> None:
        """What is about to run, said once before the slow parts (compiling, the first step), and loudly what
        makes its PPL and BPB weak: repeated training text, few validation windows."""
        d, config = self.description, self.config
        data = d.data
        lines = [
            f"{d.display_name} {d.size}: {d.params:,} parameters ({d.preset} shapes), kernels: {d.kernel_path}",
            f"device {d.device} ({d.device_name}), {config.precision}"
            f"{' (bf16 working weights)' if config.working_weights else ''}, micro-batch {d.micro_batch_size} x "
            f"{d.accumulation_steps} accumulation x {d.world_size} process(es) = {d.global_batch} sequences of "
            f"{d.context:,} tokens per step",
            f"data {data['folder']} ({data['tokenizer']}): {config.max_steps} steps = {data['training_tokens']:,} "
            f"training tokens of {data['train_tokens']:,} ({data['training_passes']:.2f} passes, "
            f"{config.data_order} order); validation on {data['validation_windows']} windows",
        ]
        if config.compile and d.device.startswith("cuda"):
            lines.append("compiling: the first step includes compilation (tens of seconds)")
        if self.kernel_warmup is not None:
            lines.append(f"a helper process compiles the library's kernels meanwhile ({kernel_warmup.LOG_NAME})")
        if d.device == "cpu" and (d.preset != "tiny" or d.context > 1024):
            lines.append(f"WARNING: {d.preset} shapes at {d.context:,} tokens on a CPU take minutes per step; "
                         "--preset tiny --seq_len 256 checks that the code runs in seconds")
        for line in lines:
            self.log.say(line)
        if data["training_passes"] > 1:
            self.log.say(f"WARNING: the budget is {data['training_passes']:.2f} passes over the training split, "
                         "so text repeats and validation measures memorisation as well; prepare more data or "
                         "lower --max_steps")
        if data["validation_windows"] < 32:
            self.log.say(f"WARNING: validation on {data['validation_windows']} windows (fewer than 32): PPL and "
                         "BPB are noisy; hold out more text (--val_fraction) or raise --eval_windows")

    def _resume(self) -> None:
        """Continue from the checkpoint; without one, start at step 0 out loud, or refuse where a checkpoint
        was promised (an interrupted run always saves one)."""
        if checkpoint.exists(self.output):
            self._check_same_run()
            self.step, restored = checkpoint.load(self.output, self.model, self.optimizer, self.scheduler)
            if not restored:
                self.log.say("resuming without AdamW state (checkpoint saved without --save_optimizer)")
            self.log.say(f"resumed from step {self.step}")
            return
        try:
            earlier = read_results(self.output)["status"]
        except (OSError, ResultsError):
            earlier = None
        if earlier == "interrupted":
            raise DataError(f"{self.output}: the interrupted run's checkpoint is missing, so --resume cannot "
                            "continue it; move the folder away to start again")
        if (self.output / LOG_FILE).exists():
            self.log.say(f"no checkpoint in {self.output} (the earlier attempt ended {earlier or 'without results'}"
                         "): starting again at step 0")

    def _check_same_run(self) -> None:
        """A checkpoint continues only the run it came from: the same family, preset, size, shapes and data
        as the description it left in config.json (checked before any weight is loaded)."""
        try:
            earlier = json.loads((self.output / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return  # no description to compare with: the weights' own shapes are still checked on loading
        now = self.description.as_dict()
        earlier_data, now_data = (earlier.get("data") or {}).get("content_sha256"), now["data"]["content_sha256"]
        for key in ("family", "preset", "size", "shape"):
            if key in earlier and earlier[key] != now[key]:
                raise DataError(f"{self.output}: its checkpoint is of {key} {earlier[key]}, this run is of "
                                f"{now[key]}; choose another --output_dir, or drop --resume")
        if earlier_data and earlier_data != now_data:
            raise DataError(f"{self.output}: its checkpoint trained on other data (content {earlier_data[:12]}, "
                            f"now {now_data[:12]}: another --data_path or tokenizer); choose another --output_dir")

    def header(self, outcome: Outcome) -> RunHeader:
        """The results header: the description's, or the config's alone when setup did not get that far."""
        if self.description is not None:
            return self.description.header(outcome.status, outcome.error, self.step, outcome.details)
        config = self.config
        return RunHeader(status=outcome.status, error=outcome.error, details=outcome.details, model=config.model,
                         display_name=self.family.display_name, size=config.model_size, preset=config.preset,
                         context=config.seq_len, steps=self.step, global_batch=config.global_batch,
                         activation_checkpointing=config.activation_checkpointing, compile=config.compile,
                         attention=config.attention, cuda_graphs=config.cuda_graphs)

    # -------------------------------------------------------------------------------------------- loop
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer iteration: accumulation over micro-batches, clipping, AdamW, schedule. With
        --cuda_graphs, the second step captures the forward and backward passes and every later step replays
        them.

        Returns the summed micro-batch losses and the gradient norm, still on the device (no sync here).
        """
        config = self.config
        batches = [self._micro_batch(index) for index in range(self.accumulation)]
        if config.cuda_graphs and self.graphed_step is None and self.step > self.first_step:
            self.graphed_step = GraphedStep(self._forward_backward, batches, self._drop_gradients)
        if self.graphed_step is None:
            loss_sum = self._forward_backward(batches)
        else:
            loss_sum = self.graphed_step.run(batches)
        with self._masters():
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            if self.graphed_step is None:  # a replay overwrites the gradients its capture created
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_sum, grad_norm

    def _drop_gradients(self) -> None:
        with self._masters():  # so that working weights drop their float32 sums too
            self.optimizer.zero_grad(set_to_none=True)

    def _micro_batch(self, index: int) -> Batch:
        config, context = self.config, self.context
        inputs, labels = self.train_windows.training_batch(
            config.seed, self.step, index, context.rank, self.micro_batch, config.data_order, self.accumulation,
            context.world_size)
        return inputs.to(context.device, non_blocking=True), labels.to(context.device, non_blocking=True)

    def _forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Forward and backward passes over the step's micro-batches, the gradients accumulated; the summed
        losses."""
        config, context = self.config, self.context
        loss_sum = torch.zeros((), device=context.device)
        for index, (inputs, labels) in enumerate(batches):
            last = index == len(batches) - 1
            # DDP all-reduces gradients only on the last micro-batch.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with compute_context(config, context.device):
                    loss = self.model(inputs, labels)
                self._finish_kernel_warmup()  # before any gradient exists, so the helper's memory is free by then
                (loss / len(batches)).backward()
            loss_sum += loss.detach()
        return loss_sum

    def _finish_kernel_warmup(self) -> None:
        if self.kernel_warmup is None:
            return
        self.kernel_warmup_record = self.kernel_warmup.finish()
        self.kernel_warmup = None
        if "kernel_warmup_error" in self.kernel_warmup_record:
            self.log.say(f"the kernel warm-up helper failed ({self.kernel_warmup_record['kernel_warmup_error']}); "
                         "the training process compiles the library's kernels itself, as it would without it")

    def run(self, monitor: Monitor, stop: StopRequest) -> Outcome:
        compiles = TritonCompileLog().start()  # the first step's library kernels, logged with that step
        try:
            return self._train(monitor, stop, compiles)
        finally:
            compiles.stop()
            gc.unfreeze()  # _freeze_heap's objects: collectable again once the steps are done

    def _train(self, monitor: Monitor, stop: StopRequest, compiles: TritonCompileLog) -> Outcome:
        config = self.config
        self.log.open(self.step, config.max_steps)
        monitor.start()
        first_step = True
        last_boundary = time.perf_counter()
        while self.step < config.max_steps:
            if stop.signal_name:
                monitor.pause()
                self._save_checkpoint(with_optimizer=True)
                return Outcome("interrupted", EXIT_INTERRUPTED, f"stopped by {stop.signal_name} at step {self.step}")
            try:
                loss_sum, grad_norm = self.train_step()
            except torch.cuda.OutOfMemoryError:
                if not self._may_halve_micro_batch(first_step):
                    raise
                loss_sum = None
            if loss_sum is None:  # out here, the failed step's tensors are released before the cache is emptied
                self._halve_micro_batch()
                continue
            first_step = False
            tokens_per_step = self.micro_batch * self.accumulation * config.seq_len
            monitor.iteration_done(tokens_per_step)
            self.step += 1
            now = time.perf_counter()
            # the global batch's loss, so that every rank logs it and stops together on a non-finite one
            loss = (distributed.mean_over_ranks(loss_sum, self.context) / self.accumulation).item()
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {self.step}")
            self.log.step({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "step_s": now - last_boundary,
                           "tokens_per_s": tokens_per_step * self.context.world_size / (now - last_boundary),
                           **compiles.stop(), **self.kernel_warmup_record},  # both the first step's alone
                          monitor.latest_readings())
            self.kernel_warmup_record = {}
            self._between_steps(monitor)
            if self.step == self.first_step + 1 and self.step < config.max_steps:
                self._freeze_heap(monitor)
            last_boundary = time.perf_counter()
        return Outcome("completed", 0)

    def _freeze_heap(self, monitor: Monitor) -> None:
        """After the first step, the objects it left (compiled graphs, guards, kernels: millions of them) are moved
        out of the garbage collector's reach. Each of its full passes walks every object it tracks: at 3B one
        took 0.2-0.4 s out of a later step, in about one round of eight steps in two (docs/performance.md,
        change 43). Out of the measured window, as evaluation is."""
        monitor.pause()
        started = time.perf_counter()
        gc.collect()  # what is garbage now is freed, not frozen
        gc.freeze()
        self.log.say(f"{gc.get_freeze_count():,} objects from the first step frozen out of the garbage collector's "
                     f"passes ({time.perf_counter() - started:.2f} s)")
        monitor.resume()

    def _may_halve_micro_batch(self, first_step: bool) -> bool:
        """Only the automatic micro-batch of a single process shrinks, and only while finding its size."""
        return first_step and self.config.micro_batch_size is None and self.context.world_size == 1 \
            and self.micro_batch > 1

    def _halve_micro_batch(self) -> None:
        self._drop_gradients()  # the failed step's gradients and their sums
        if self.context.cuda_indices:
            torch.cuda.empty_cache()
        per_rank, failed = self.micro_batch * self.accumulation, self.micro_batch
        micro_batch = max(size for size in range(1, failed) if per_rank % size == 0)
        self.description = dataclasses.replace(self.description, micro_batch_size=micro_batch,
                                               accumulation_steps=per_rank // micro_batch)
        write_json_atomic(self.output / CONFIG_FILE, self.description.as_dict())  # one process: it is rank 0
        self.log.say(f"micro-batch {failed} ran out of memory; retrying the first step as {self.micro_batch} "
                     f"sequences x {self.accumulation} accumulation steps")

    def _between_steps(self, monitor: Monitor) -> None:
        """Periodic evaluation and checkpoints, paused out of the measured window."""
        config = self.config
        evaluate_now = config.eval_interval and self.step % config.eval_interval == 0 and self.step < config.max_steps
        save_now = (config.checkpoint_interval and self.step % config.checkpoint_interval == 0
                    and self.step < config.max_steps)
        if not (evaluate_now or save_now):
            return
        monitor.pause()
        if evaluate_now:
            validation = evaluate(self.model, self.val_windows, config, self.micro_batch, self.context.device)
            self.log.validation(self.step, validation)
        if save_now:
            self._save_checkpoint(config.save_optimizer)
        monitor.resume()

    def close(self) -> None:
        """Stop a helper that setup started and no step waited for (the run failed before), close the log."""
        if self.kernel_warmup is not None:
            self.kernel_warmup.stop()
        self.log.close()

    def finish(self) -> None:
        """Final validation and checkpoint of a completed run."""
        self.validation = evaluate(self.model, self.val_windows, self.config, self.micro_batch, self.context.device)
        self.log.validation(self.step, self.validation)
        if self.config.final_checkpoint:
            self._save_checkpoint(self.config.save_optimizer)
