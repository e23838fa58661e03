"""What base, sft and dpo share around a Trainer: device fallbacks, live curves, the NaN guard, resume, safe saves."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.errors import ConfigError, ProjectError
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


def build_args(config_cls: type, section: str, trainer_kwargs: dict[str, Any], **owned: Any):
    """`config_cls(**trainer_kwargs, **owned)`; a key it rejects becomes a ConfigError naming `section.trainer.KEY`.

    `owned` are the fields the pipeline sets itself (output_dir, seed, report_to); setting them in params is an error.
    """
    clash = sorted(set(trainer_kwargs) & set(owned))
    if clash:
        raise ConfigError(f"{section}.trainer.{clash[0]}: set by the pipeline, remove it from params.yaml")
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
    """Spare the Trainer its walks over the whole model at every optimizer step.

    Each step it calls model.train() (recursing through every module), model.zero_grad() (every parameter) and, for
    its FLOP count, model.num_parameters(). With LoRA on the seven projections of a 32-layer model that is about
    2,700 modules and 740 parameters: 22 ms per step on a 2-core CPU, while the fast layout's GPU waits. When
    training begins this lists them once; train() and zero_grad() then set the same flags and clear the same
    gradients over those lists, and the parameter count is counted once (training adds no modules or parameters).
    Left as it is where a module's own train() does more than set its flag (transformers' hub kernels).
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import functools

        from torch import nn
        from transformers import PreTrainedModel

        if model is None or getattr(model, "use_kernels", False):
            return
        modules = list(model.modules())
        if any(type(module).train not in (nn.Module.train, PreTrainedModel.train) for module in modules):
            return
        parameters = list(model.parameters())

        def train(mode: bool = True):
            for module in modules:
                module.__dict__["training"] = mode  # what nn.Module.train sets, without its recursion
            return model

        def zero_grad(set_to_none: bool = True) -> None:
            for parameter in parameters:
                if parameter.grad is None:
                    continue
                if set_to_none:
                    parameter.grad = None
                else:
                    parameter.grad.detach_().zero_()

        model.train, model.zero_grad = train, zero_grad
        if hasattr(model, "num_parameters"):  # transformers' models
            model.num_parameters = functools.cache(model.num_parameters)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Back to the module methods: the lists would otherwise keep every module of the run alive with the model.
        if model is not None:
            for name in ("train", "zero_grad", "num_parameters"):
                model.__dict__.pop(name, None)


class LogPeakMemory(TrainerCallback):
    """Add the peak GPU memory so far to every log line: memory is what decides which GPU a recipe needs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import torch

        if logs is not None and torch.cuda.is_available():
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


class ReportSharding(TrainerCallback):
    """Print how FSDP sharded the model once the Trainer has wrapped it (see finetune.training.launch.sharding_summary)."""

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


class ProfileSteps(TrainerCallback):
    """Run the torch profiler over optimizer steps `first`..`first + count - 1` and write, per process, a table of the
    busiest operations, the timeline (trace_rankN.json.gz, which benchmarks/idle_gaps.py reads) and a summary: wall
    time of those steps, kernel time, and the share of the wall the GPU was busy with compute. Set
    STAGES_PROFILE=FOLDER to profile a stage as `dvc repro` runs it, and STAGES_PROFILE_STACKS=1 for Python frames.

    The later steps are profiled because the first ones compile (one shape, then dynamic shapes).
    """

    def __init__(self, folder: str, first: int = 8, count: int = 4, python_frames: bool = False):
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
    python_frames = os.environ.get(PROFILE_STACKS_ENV, "") not in ("", "0")
    return [ProfileSteps(folder, python_frames=python_frames)] if folder else []


def live_callbacks(metrics_dir: str, resume: bool, params: dict[str, Any] | None = None) -> list[TrainerCallback]:
    """Curves under metrics_dir/ (metrics.json + plots/metrics/*.tsv), kept out of dvc.yaml (dvcyaml=False), and
    `params` (what the stage resolved at run time, e.g. its GPU layout) in metrics_dir/params.yaml; with the NaN
    guard, the profiler when asked for, and WalkModulesOnce, the callbacks every training stage runs.

    A resumed run appends to the curves of the interrupted one instead of starting them over.
    """
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    from finetune.training.launch import is_main_process

    if not is_main_process():  # one writer: the other GPUs' processes only guard against NaNs
        return [WalkModulesOnce(), StopOnNonFiniteLoss(), *profile_callbacks()]

    from scmrepo.exceptions import SCMError

    try:
        live = Live(metrics_dir, dvcyaml=False, save_dvc_exp=False, resume=resume)
    except SCMError as error:  # e.g. a fresh `git init` with no commit yet: DVCLive reads the current revision
        raise ProjectError(f"{metrics_dir}: DVCLive cannot read the git repository ({error}); commit first") from None
    if "data" in getattr(live, "_studio_events_to_skip", ()):
        # Studio is not configured, so its "data" event is dropped; but DVCLive 3.49 builds that event's payload at
        # every log line first, re-parsing metrics_dir/params.yaml and every curve (56 ms per line on a 2-core CPU,
        # growing with the run; about 30 ms of idle GPU per step in the H100 profile of the fast layout).
        live.post_data_to_studio = _nothing_to_post
    if params:
        live.log_params(params)
    # Ours runs first: transformers' callback logs at live.step, then advances it.
    return [
        WalkModulesOnce(),
        LogPeakMemory(),
        ReportSharding(),
        LogThroughput(),
        LogEveryStepToDvcLive(live),
        DVCLiveCallback(live=live),
        StopOnNonFiniteLoss(),
        *profile_callbacks(),
    ]


def _nothing_to_post() -> None:
    return None


RUN_FILE = "run.json"


def checkpoint_to_resume(output_dir: str, settings: dict[str, Any]) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same settings, if any.

    Checkpoints of other settings are removed: without this, `dvc exp run -S lora.r=8` after a killed r=16 run would
    resume the r=16 run. So are checkpoints cut short by a kill while saving (the Trainer writes trainer_state.json
    last), which the Trainer would otherwise fail on at every rerun.
    """
    from finetune.training.launch import is_main_process, wait_for_everyone

    folder = Path(output_dir)
    fingerprint = json.dumps(settings, sort_keys=True, default=str)
    run_file = folder / RUN_FILE
    if is_main_process():  # the other processes read the folder once it is settled
        if folder.is_dir() and (not run_file.is_file() or run_file.read_text() != fingerprint):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(fingerprint)
    wait_for_everyone()
    numbered = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    checkpoints = sorted(numbered, key=lambda path: int(path.name.split("-")[-1]))
    complete = [path for path in checkpoints if (path / "trainer_state.json").is_file()]
    for path in checkpoints:
        if path not in complete and is_main_process():
            shutil.rmtree(path)
    if not complete:
        return None
    print(f"resuming from {complete[-1]}")
    return str(complete[-1])


def finish_run(output_dir: str) -> None:
    """Drop the checkpoints of a finished run: the next run must start afresh, and the adapter is saved."""
    from finetune.training.launch import is_main_process, wait_for_everyone

    wait_for_everyone()
    if is_main_process():
        shutil.rmtree(output_dir, ignore_errors=True)


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
    final = Path(destination)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(str(partial))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
