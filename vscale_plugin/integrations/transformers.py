"""Gradient-sink statistics inside a Hugging Face ``Trainer`` (TRL's ``SFTTrainer`` is one): SPEC section 8.

``GradientSinkCallback(every=100)`` captures every ``every``-th optimiser step over all its micro-batches with a
:class:`~vscale_plugin.stats.StatsCollector` and adds every SPEC section 4 key to the Trainer's logs at that
``global_step``, so that whatever ``report_to`` names (transformers' own ``MLflowCallback``, tensorboard, wandb)
receives them. Steps that are not due install no hook.

Where the Trainer runs DeepSpeed, backward, clipping, the optimiser step and ``zero_grad`` all happen inside
``accelerator.backward`` on the boundary micro-batch (Accelerate's ``DeepSpeedEngineWrapper``); the collector reads the
parameter gradients inside that ``engine.backward``, before the step. Without DeepSpeed they are read right after the
boundary micro-batch's backward, before the Trainer clips them. Either way the values are those of
:func:`vscale_plugin.measure` on the step's global batch.

``VScaleTrainer`` / :func:`without_vscale_decay` keep theta out of weight decay, which ``Trainer`` otherwise applies to
every parameter that is neither a bias nor in a norm layer.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from vscale_plugin.hf.decay import no_decay_parameter_names
from vscale_plugin.hf.registry import layer_parts
from vscale_plugin.stats.collector import StatsCollector

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - transformers is a dependency
    raise ImportError("vscale_plugin.integrations.transformers needs transformers: pip install transformers") from err


class GradientSinkCallback(TrainerCallback):
    """Adds the SPEC section 4 metrics of every ``every``-th optimiser step to the Trainer's logs.

    ``profiles=True`` also writes the per-position gradient norms of each captured step to
    ``<output_dir>/gradient_profiles/profiles_step<N>.json`` (main process), and logs the file as an artifact of the
    active MLflow run when there is one. Pass it as ``Trainer(..., callbacks=[GradientSinkCallback(every=100)])``.

    ``console="summary"`` (the default) keeps the per-layer and per-head keys (``.../L03``, ``.../L03/H1``; tens per
    layer) out of what transformers prints to the console (its progress bar or ``PrinterCallback``), which then shows
    the model-level summaries (``gs/ratio/median``, ``as/sink_rate/mean``, ...); every key still reaches the logs, the
    log history and each ``report_to`` integration. ``console="all"`` prints everything.
    """

    def __init__(self, every: int = 100, profiles: bool = False, console: str = "summary") -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(
                f"GradientSinkCallback(every={every!r}): every is the number of optimiser steps between captures, an "
                "integer >= 1 (every=1 captures every step)"
            )
        if console not in CONSOLE:
            raise ValueError(f"GradientSinkCallback(console={console!r}): choose one of {', '.join(CONSOLE)}")
        self.every = every
        self.profiles = profiles
        self.console = console
        self.collector: StatsCollector | None = None
        self._trainer: Trainer | None = None
        self._pending: dict[str, float] = {}
        self._restore_backward = None
        self._restore_console = None

    # ---- Trainer events ----

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _check_model(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = _calling_trainer()
        _check_model(trainer.model)
        _check_optimizer(trainer.model, optimizer)
        _run_first(trainer, self)  # our on_log must fill the logs before the reporting callbacks read them
        if self.console == "summary":
            self._restore_console = _print_summaries_only(trainer)
        self._trainer = trainer
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        self.collector = StatsCollector(engine, every=self.every)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.collector is None:
            return
        step = state.global_step + 1  # the step these micro-batches make; global_step counts finished ones
        if self.collector.start(step) and not self._trainer.is_deepspeed_enabled:
            self._read_gradients_after_boundary_backward()

    def on_step_end(self, args, state, control, **kwargs):
        if self.collector is None or not self.collector.active:
            return
        self._restore()
        self._pending = self.collector.stop()
        if self.profiles and state.is_world_process_zero:
            self._write_profiles(args, state.global_step)
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.collector is not None and self.collector.active:  # training stopped mid-step (an exception)
            self._restore()
            self.collector._release()
        if self._restore_console is not None:
            self._restore_console()
            self._restore_console = None

    # ---- helpers ----

    def _read_gradients_after_boundary_backward(self) -> None:
        # Trainer clips gradients right after the boundary micro-batch's backward; read them before that.
        accelerator = self._trainer.accelerator
        original = accelerator.backward

        def backward(loss, **kwargs):
            out = original(loss, **kwargs)
            if accelerator.sync_gradients:
                self.collector.read_parameter_gradients()
            return out

        accelerator.backward = backward
        self._restore_backward = lambda: delattr(accelerator, "backward")

    def _restore(self) -> None:
        if self._restore_backward is not None:
            self._restore_backward()
            self._restore_backward = None

    def _write_profiles(self, args, step: int) -> None:
        path = Path(args.output_dir) / "gradient_profiles" / f"profiles_step{step:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, **self.collector.profiles()}))
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_artifact(str(path), artifact_path="gradient_profiles")


def without_vscale_decay(decay_names: list[str], model: nn.Module) -> list[str]:
    """``decay_names`` (what ``Trainer.get_decay_parameter_names`` returns) without theta, biases and norms."""
    exempt = set(no_decay_parameter_names(model))
    return [name for name in decay_names if name not in exempt]


class VScaleTrainer(Trainer):
    """``Trainer`` that never weight-decays V-scale's theta (nor biases and norms, as ``Trainer`` already does).

    The whole difference is one method; in a Trainer subclass of your own (``SFTTrainer``...) add the same::

        def get_decay_parameter_names(self, model):
            return without_vscale_decay(super().get_decay_parameter_names(model), model)
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        return without_vscale_decay(super().get_decay_parameter_names(model), model)


# ---- checks ----


def _check_model(model: nn.Module) -> None:
    try:
        layer_parts(model)
    except (NotImplementedError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"GradientSinkCallback: cannot measure {type(model).__name__}: {err}. The callback needs a decoder of an "
            "architecture in vscale_plugin.REGISTRY with statistics"
        ) from err


def _check_optimizer(model: nn.Module, optimizer: Any) -> None:
    """theta that the optimizer does not know (V-scale applied after the optimizer was built) would never train."""
    thetas = [(name, p) for name, p in model.named_parameters() if ".vscale." in name and p.requires_grad]
    if not thetas or optimizer is None:
        return
    known = _optimized_parameters(optimizer)
    missing = [name for name, p in thetas if id(p) not in known]
    if missing:
        raise RuntimeError(
            f"V-scale was applied after the optimizer was built: {len(missing)} theta parameters (e.g. {missing[0]}) "
            "are not in it and would never train. Call vscale_plugin.apply_vscale(model) before creating the "
            "optimizer (before Trainer(..., optimizers=...) or trainer.create_optimizer())"
        )


def _optimized_parameters(optimizer: Any) -> set[int]:
    """ids of the model parameters an optimizer updates, through Accelerate's and DeepSpeed's wrappers (ZeRO keeps
    the model's parameters in ``bit16_groups`` (stages 1-2) or ``fp16_groups`` (stage 3), its param_groups hold flat
    partitions)."""
    known: set[int] = set()
    while optimizer is not None:
        for group in getattr(optimizer, "param_groups", None) or []:
            known.update(id(p) for p in group["params"])
        for groups in (getattr(optimizer, "bit16_groups", None), getattr(optimizer, "fp16_groups", None)):
            known.update(id(p) for group in groups or [] for p in group)
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not optimizer else None
    return known


def _calling_trainer() -> Trainer:
    """The Trainer whose callback handler is calling us (callbacks are not given the Trainer itself)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "GradientSinkCallback runs inside a transformers Trainer: pass it as Trainer(..., callbacks=[...]); in a loop "
        "of your own use vscale_plugin.StatsCollector's start(step) / stop()"
    )


CONSOLE = ("summary", "all")
_PER_LAYER = re.compile(r"/L\d+(/H\d+)?$")  # SPEC section 4: .../L03 per layer, .../L03/H1 per KV head


def _print_summaries_only(trainer: Trainer):
    """Make transformers' console printers (progress bar, PrinterCallback) skip per-layer keys; returns the undo."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    printers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, (ProgressCallback, PrinterCallback))]
    for printer in printers:
        original = printer.on_log

        def on_log(args, state, control, logs=None, _original=original, **kwargs):
            if logs is not None:
                logs = {k: v for k, v in logs.items() if not _PER_LAYER.search(k)}
            return _original(args, state, control, logs=logs, **kwargs)

        printer.on_log = on_log

    def restore() -> None:
        for printer in printers:
            del printer.on_log  # the instance attribute; the class's method shows again

    return restore


def _run_first(trainer: Trainer, callback: TrainerCallback) -> None:
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)
