"""Cost of GradientSinkCallback in a transformers Trainer: optimiser steps with and without it, side by side.

    python benchmarks/trainer_callback.py --device cpu --steps 40 --every 10

Three arms of the same Trainer run (same model, data and seed) are timed in alternation: no callback, the callback
with `every` larger than the run (it never captures: the cost of being installed), and the callback capturing every
`every`-th step. Reported as ratios to the plain arm (per step, median over rounds), never as absolute claims.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, machine
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import vscale_plugin as vsp
from vscale_plugin.integrations.transformers import GradientSinkCallback, VScaleTrainer
from vscale_plugin.testing.models import tiny_config


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per arm and round")
    p.add_argument("--every", type=int, default=10, help="capture interval of the capturing arm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def run_arm(args, model_state, config, callback, workdir: Path) -> list[float]:
    model = vsp.apply_vscale(AutoModelForCausalLM.from_config(config))
    model.load_state_dict(model_state)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.steps * args.batch, args.seq_len), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    timer = StepTimer()
    training = TrainingArguments(output_dir=str(workdir), per_device_train_batch_size=args.batch,
                                 max_steps=args.steps, report_to=[], save_strategy="no", logging_steps=10**9,
                                 use_cpu=args.device == "cpu", disable_tqdm=True, seed=0)  # fmt: skip
    trainer_class = VScaleTrainer if callback is not None else Trainer
    callbacks = [callback, timer] if callback is not None else [timer]
    trainer_class(model=model, args=training, train_dataset=data, callbacks=callbacks).train()
    return timer.times[1:]  # the first step warms up


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = tiny_config("llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=args.hidden // 4, vocab_size=1024, max_position_embeddings=args.seq_len)  # fmt: skip
    torch.manual_seed(0)
    state = vsp.apply_vscale(AutoModelForCausalLM.from_config(config)).state_dict()
    arms = {
        "plain": lambda: None,
        "idle": lambda: GradientSinkCallback(every=10**9),
        "capturing": lambda: GradientSinkCallback(every=args.every),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    captured: list[float] = []  # the capturing arm's due steps
    capture_free: list[float] = []  # and its other steps
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name, make in arms.items():
                steps = run_arm(args, state, config, make(), Path(work))
                times[name] += steps
                if name == "capturing":
                    for step, t in enumerate(steps, start=2):  # run_arm drops step 1
                        (captured if step % args.every == 0 else capture_free).append(t)
    plain = statistics.median(times["plain"])
    result = {
        "benchmark": "trainer_callback",
        "machine": machine(device),
        "shape": {"hidden": args.hidden, "layers": args.layers, "seq_len": args.seq_len, "batch": args.batch},
        "steps_per_arm": args.steps * args.rounds,
        "every": args.every,
        "plain_step_s": plain,
        "idle_callback_ratio": statistics.median(times["idle"]) / plain,
        "non_capture_step_ratio": statistics.median(capture_free) / plain,
        "capture_step_ratio": statistics.median(captured) / plain,
        "amortised_ratio": statistics.mean(times["capturing"]) / statistics.mean(times["plain"]),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
