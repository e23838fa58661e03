"""What base, sft and dpo share around a Trainer: device fallbacks, live curves, the NaN guard, resume, safe saves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.core.errors import ConfigError, ProjectError
from finetune.model.loading import CUDA_ONLY_OPTIMIZERS, has_cuda


def adapt_to_device(trainer_kwargs: dict[str, Any], cuda: bool) -> tuple[dict[str, Any], list[str]]:
    """Trainer kwargs that can run on this device, and a note for every value changed.

    Paged and 8-bit optimizers and bf16/fp16 autocast need CUDA; on a CPU the run falls back to AdamW in float32.
    """
    kwargs, notes = dict(trainer_kwargs), []
    if kwargs.get("fp16"):
        notes.append("fp16 is known to give NaN losses with Mistral and in DPO; bf16 is the safer choice on GPUs")
    if cuda:
        return kwargs, notes
    optim = str(kwargs.get("optim", ""))
    if any(marker in optim for marker in CUDA_ONLY_OPTIMIZERS):
        kwargs["optim"] = "adamw_torch"
        notes.append(f"optim {optim} needs CUDA; using adamw_torch on the CPU")
    for precision in ("bf16", "fp16"):
        if kwargs.get(precision):
            kwargs[precision] = False
            notes.append(f"{precision} mixed precision needs a GPU; training in float32 on the CPU")
    return kwargs, notes


# Trainer values that TrainingArguments accepts but that fail deep inside training, with the bound they must meet.
POSITIVE = ("learning_rate", "num_train_epochs", "beta", "logging_steps", "save_steps", "eval_steps")
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
NOT_NEGATIVE = ("weight_decay", "warmup_steps", "max_grad_norm", "max_length")


def check_trainer_values(config_cls: type, section: str, trainer_kwargs: dict[str, Any]) -> None:
    """A one-line ConfigError naming `section.trainer.KEY` and its value for a value of the wrong type or range."""
    import types
    import typing

    hints = typing.get_type_hints(config_cls)
    for key, value in trainer_kwargs.items():
        hint = hints.get(key)
        allowed = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        if value is None and type(None) in allowed:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if allowed & {int, float} and not (allowed & {str}) and not is_number:
            kind = "a number" if float in allowed else "an integer"
            raise ConfigError(f"{section}.trainer.{key}: must be {kind}, got {value!r}")
        if allowed == {int} and is_number and not float(value).is_integer():
            raise ConfigError(f"{section}.trainer.{key}: must be an integer, got {value!r}")
        if not is_number:
            continue
        if key in POSITIVE and value <= 0:
            raise ConfigError(f"{section}.trainer.{key}: must be greater than 0, got {value!r}")
        if key in AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{section}.trainer.{key}: must be at least 1, got {value!r}")
        if key in NOT_NEGATIVE and value < 0:
            raise ConfigError(f"{section}.trainer.{key}: must not be negative, got {value!r}")


def build_args(config_cls: type, section: str, trainer_kwargs: dict[str, Any], **owned: Any):
    """`config_cls(**trainer_kwargs, **owned)`; a key it rejects becomes a ConfigError naming `section.trainer.KEY`.

    `owned` are the fields the pipeline sets itself (output_dir, seed, report_to); setting them in params is an error.
    """
    clash = sorted(set(trainer_kwargs) & set(owned))
    if clash:
        raise ConfigError(f"{section}.trainer.{clash[0]}: set by the pipeline, remove it from params.yaml")
    check_trainer_values(config_cls, section, trainer_kwargs)
    try:
        return config_cls(**trainer_kwargs, **owned)
    except TypeError as error:
        message = str(error)
        key = message.split("'")[1] if "unexpected keyword argument" in message else None
        where = f"{section}.trainer.{key}" if key else f"{section}.trainer"
        raise ConfigError(f"{where}: not accepted by {config_cls.__name__} ({message.split(': ')[-1]})") from None
    except ValueError as error:
        raise ConfigError(f"{section}.trainer: {str(error).splitlines()[0]}") from None


def trainer_args(config_cls: type, section: str, trainer_kwargs: dict[str, Any], output_dir: str):
    """The stage's TrainingArguments/SFTConfig/DPOConfig: params' `trainer` keywords, adapted to the device.

    The NaN filter is off because it reports a NaN step loss as 0.0, which would hide the divergence from our guard.
    """
    cuda = has_cuda()
    kwargs, notes = adapt_to_device(trainer_kwargs, cuda)
    for note in notes:
        print(f"{section}: {note}")
    owned = {"output_dir": output_dir, "report_to": "none", "logging_nan_inf_filter": False}
    if not cuda:
        owned["use_cpu"] = True
    return build_args(config_cls, section, kwargs, **owned)


class NonFiniteLossError(ProjectError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """Fail the run at the first NaN or infinite loss, so a broken adapter is never saved or cached as a result."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for name in ("loss", "grad_norm"):
            value = (logs or {}).get(name)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} became {value} at step {state.global_step}; "
                    "lower the learning rate, or use bf16 instead of fp16"
                )


class LogEveryStepToDvcLive(TrainerCallback):
    """Align DVCLive's step with the optimizer step; its callback otherwise counts log events."""

    def __init__(self, live):
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.live.step = state.global_step


class WalkModulesOnce(TrainerCallback):
    """Spare the Trainer its walks over the whole model at every optimizer step (finetune.overrides.walk_modules_once:
    train(), zero_grad() and num_parameters() over lists made when training begins), and undo it when it ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from finetune.overrides import walk_modules_once

        if model is not None:
            walk_modules_once(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from finetune.overrides import restore_module_walks

        if model is not None:
            restore_module_walks(model)


class LogPeakMemory(TrainerCallback):
    """Add the peak GPU memory so far to every log line: memory is what decides which GPU a recipe needs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import torch

        if logs is not None and torch.cuda.is_available():
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


class RecordCost(TrainerCallback):
    """Put the stage's wall time and peak GPU memory so far (finetune.core.process.process_cost) in DVCLive's summary
    (metrics.json, written when DVCLive's callback ends the run next), so `dvc exp show` compares runs' costs."""

    def __init__(self, live):
        self.live = live

    def on_train_end(self, args, state, control, **kwargs):
        from finetune.core.process import process_cost

        self.live.summary["cost"] = process_cost()


class ReportSharding(TrainerCallback):
    """Print how FSDP sharded the model once the Trainer has wrapped it (finetune.training.launch.sharding_summary)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from finetune.training.launch import sharding_summary

        summary = sharding_summary(model) if model is not None else None
        if summary:
            print(f"fsdp: {summary}", flush=True)


class LogThroughput(TrainerCallback):
    """Add the non-padding tokens per second since the previous log line (from TRL's `num_tokens`), so every run
    records its own speed next to its loss."""

    def __init__(self):
        self.previous: tuple[float, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        if logs is None or "num_tokens" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        if self.previous is not None and now > self.previous[0]:
            logs["tokens_per_second"] = (tokens - self.previous[1]) / (now - self.previous[0])
        self.previous = (now, tokens)


PROFILE_ENV = "STAGES_PROFILE"  # a folder: profile a few optimizer steps of sft/dpo there (see ProfileSteps)
PROFILE_STACKS_ENV = "STAGES_PROFILE_STACKS"  # 1: the trace also records Python frames (slower, larger)
PROFILE_STEPS_ENV = "STAGES_PROFILE_STEPS"  # FIRST-LAST: the optimizer steps to profile (PROFILED_STEPS)
PROFILED_STEPS = (8, 11)  # first and last, counted from 1: after the first steps, which compile


class ProfileSteps(TrainerCallback):
    """Run the torch profiler over optimizer steps `first`..`first + count - 1` and write, per process, a table of the
    busiest operations, the timeline (trace_rankN.json.gz, which benchmarks/idle_gaps.py reads) and a summary: wall
    time of those steps, kernel time, and the share of the wall the GPU was busy with compute. Set
    STAGES_PROFILE=FOLDER to profile a stage as `dvc repro` runs it, STAGES_PROFILE_STACKS=1 for Python frames, and
    STAGES_PROFILE_STEPS=FIRST-LAST for other steps than 8-11.

    The later steps are profiled because the first ones compile (one shape, then dynamic shapes).
    """

    def __init__(
        self,
        folder: str,
        first: int = PROFILED_STEPS[0],
        count: int = PROFILED_STEPS[1] - PROFILED_STEPS[0] + 1,
        python_frames: bool = False,
    ):
        self.folder, self.first, self.count, self.python_frames = Path(folder), first, count, python_frames
        self.profiler = None
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        import time

        import torch
        from torch.profiler import ProfilerActivity, profile

        if state.global_step + 1 == self.first and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, with_stack=self.python_frames)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import time

        import torch

        from finetune.training.launch import rank

        if self.profiler is None or state.global_step != self.first + self.count - 1:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        # Device time of kernels, copies and memsets. Annotations on the GPU's timeline (DDP's forward, NCCL's
        # calls) span other work and would count it twice.
        on_device = [
            event
            for event in self.profiler.events()
            if event.device_type != torch.autograd.DeviceType.CPU
            and not getattr(event, "is_user_annotation", False)
            and "annotation" not in str(getattr(event, "activity_type", ""))
        ]
        kernels = sum(event.device_time_total for event in on_device) / 1e6
        collectives = sum(event.device_time_total for event in on_device if "nccl" in event.name.lower()) / 1e6
        summary = (
            f"steps {self.first}-{state.global_step}: wall {wall:.3f} s ({wall / self.count:.3f} s per step), "
            f"kernels {kernels:.3f} s of which collectives {collectives:.3f} s; "
            f"GPU busy with compute {(kernels - collectives) / wall:.0%} of the wall\n"
        )
        tables = "".join(
            f"\n--- sorted by {key}\n" + events.table(sort_by=key, row_limit=40)
            for key in ("self_device_time_total", "self_cpu_time_total")
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"profile_rank{rank()}.txt").write_text(summary + tables)
        # The timeline, for chrome://tracing or ui.perfetto.dev: where in a step the GPU waits, and on what.
        self.profiler.export_chrome_trace(str(self.folder / f"trace_rank{rank()}.json.gz"))
        print(f"profile: {summary.strip()} -> {self.folder / f'profile_rank{rank()}.txt'}", flush=True)
        self.profiler = None


def profile_callbacks() -> list[TrainerCallback]:
    import os

    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        return []
    python_frames = os.environ.get(PROFILE_STACKS_ENV, "") not in ("", "0")
    steps = os.environ.get(PROFILE_STEPS_ENV)
    first, last = PROFILED_STEPS if steps is None else profiled_steps(steps)
    return [ProfileSteps(folder, first=first, count=last - first + 1, python_frames=python_frames)]


def profiled_steps(text: str) -> tuple[int, int]:
    """(first, last) optimizer steps, counted from 1, of a FIRST-LAST range such as 12-15."""
    first, _, last = text.partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit()) or not 1 <= int(first) <= int(last):
        raise ConfigError(
            f"{PROFILE_STEPS_ENV}={text!r}: give the optimizer steps to profile as FIRST-LAST, e.g. 8-11"
        )
    return int(first), int(last)


def live_callbacks(metrics_dir: str, resume: bool, params: dict[str, Any] | None = None) -> list[TrainerCallback]:
    """Curves under metrics_dir/ (metrics.json + plots/metrics/*.tsv), kept out of dvc.yaml (dvcyaml=False), and
    `params` (what the stage resolved at run time, e.g. its GPU layout) in metrics_dir/params.yaml; with the NaN
    guard, the profiler when asked for, and WalkModulesOnce, the callbacks every training stage runs.

    A resumed run appends to the curves of the interrupted one (finetune.training.resume.restore_curves).
    """
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    from finetune.overrides import skip_unconfigured_studio_posts
    from finetune.training.launch import is_main_process
    from finetune.training.resume import KeepCurvesWithCheckpoints

    if not is_main_process():  # one writer: the other GPUs' processes only guard against NaNs
        return [WalkModulesOnce(), StopOnNonFiniteLoss(), *profile_callbacks()]

    from scmrepo.exceptions import SCMError

    try:
        live = Live(metrics_dir, dvcyaml=False, save_dvc_exp=False, resume=resume)
    except SCMError as error:  # e.g. a fresh `git init` with no commit yet: DVCLive reads the current revision
        raise ProjectError(f"{metrics_dir}: DVCLive cannot read the git repository ({error}); commit first") from None
    skip_unconfigured_studio_posts(live)  # no Studio: DVCLive would build its payload at every log line
    if params:
        live.log_params(params)
    # Ours runs first: transformers' callback logs at live.step, then advances it.
    return [
        WalkModulesOnce(),
        LogPeakMemory(),
        ReportSharding(),
        LogThroughput(),
        LogEveryStepToDvcLive(live),
        RecordCost(live),
        DVCLiveCallback(live=live),
        KeepCurvesWithCheckpoints(metrics_dir),
        StopOnNonFiniteLoss(),
        *profile_callbacks(),
    ]


def eval_split(args, section: str, prepared_dir: str, name: str, columns: tuple[str, ...]):
    """The validation split the trainer evaluates on every eval_steps, or None when trainer.eval_strategy is "no"."""
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
        return None
    from finetune.data.rows import as_dataset, read_jsonl

    path = Path(prepared_dir) / name
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        raise ConfigError(
            f"{section}.trainer.eval_strategy: {path} has no rows to evaluate on; "
            "raise data.validation_size above 0 or set eval_strategy: 'no'"
        )
    return as_dataset(rows, columns)


def truncate_prompt(prompt: list[dict[str, str]], tokenizer, max_tokens: int) -> list[dict[str, str]]:
    """The prompt cut to `max_tokens` rendered tokens by dropping the start of its last turn.

    TRL removed DPO's max_prompt_length; its own truncation cuts the end of prompt + answer, which would cut the
    answers the preference is about. The end of the prompt is kept, as TRL's old prompt truncation did.
    """

    def length(messages):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return len(rendered["input_ids"])

    messages = [dict(message) for message in prompt]
    for _ in range(4):  # decoding and re-encoding can shift a token or two; a few passes settle it
        excess = length(messages) - max_tokens
        if excess <= 0:
            break
        ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        messages[-1]["content"] = tokenizer.decode(ids[excess:], skip_special_tokens=True).strip()
    return messages


def save_adapter(trainer, destination: str, adapters: list[str] | None = None) -> None:
    """The trained model's adapters (`adapters`: which, default all) and tokenizer, written atomically to destination.

    Under FSDP each process holds a shard of every weight, so all of them first join in gathering the trainable
    weights (the adapter; not the frozen base, which would be gigabytes), then the main process writes them.
    """
    weights = gathered_trainable_weights(trainer.model) if getattr(trainer, "is_fsdp_enabled", False) else None

    def save(folder: str) -> None:
        trainer.model.save_pretrained(folder, state_dict=weights, selected_adapters=adapters)
        trainer.processing_class.save_pretrained(folder)

    save_atomically(save, destination)


def gathered_trainable_weights(model) -> dict[str, Any]:
    """Every trainable parameter whole, on the CPU. A sharded one (FSDP2's DTensor) is gathered from all processes,
    so every process must call this, for the same parameters in the same order."""
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            whole = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            weights[name] = whole.detach().cpu()
    return weights


def save_atomically(save, destination: str) -> None:
    """Write with `save(tmp_dir)` then rename over `destination`: a crash never leaves a half-written model."""
    from finetune.training.launch import is_main_process, wait_for_everyone

    wait_for_everyone()  # every process has finished training
    if not is_main_process():
        return
    from finetune.core.files import atomic_path

    with atomic_path(destination) as partial:
        save(str(partial))
