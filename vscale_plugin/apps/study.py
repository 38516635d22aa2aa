"""``vsp-study`` (``launchers/study.py``, ``python -m vscale_plugin.apps.study``): the paper's paired experiment in one
command - baseline and V-scale trained with the same seed, data and recipe through the real ``deepspeed`` launcher,
then (with ``--evaluate``) their downstream evaluation, then the comparison report on the runs.

    vsp-study --preset smoke --steps 150                                      # CPU, a few minutes per run
    vsp-study --preset sinklab                       # Bigram-Backcopy: sinks form; baseline, learned, fixed V-scale
    vsp-study --preset smoke --evaluate              # then both models downstream: perplexity, NIAH, quantised
    vsp-study --preset 0.1B --dataset c4 --num_gpus 8 -- --tokenizer gpt2 --save_every 1000

Both runs and the comparison are the installed modules, started by the interpreter running the study, so they use
the same vscale_plugin as the study, in a checkout or not.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vscale_plugin.launch.cli import ConfigError, OneLineParser, UsageError, fail
from vscale_plugin.launch.ds_config import CONFIG_DIR, resolve_ds_config
from vscale_plugin.ops.vscale import MODES
from vscale_plugin.train.recipe import PRESETS

# The modes a study trains when --modes is not given.
STUDY_MODES = {"sinklab": ("off", "learned", "fixed")}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to both pretrain.py runs unchanged
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = OneLineParser(prog="vsp-study", description="Baseline vs V-scale, same seed and data, then the comparison.")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of each run (default: the preset's)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated --vscale modes: 'off' (the baseline) and any of {', '.join(MODES)} (backward: the "
        "paper's backward-only ablation); default: off,learned; off,learned,fixed for sinklab",
    )
    p.add_argument("--dataset", default=None, help="default: the preset's (bigram_backcopy for sinklab, else smoke)")
    p.add_argument("--ds_config", default=str(CONFIG_DIR / "zero2.json"), help="a path or a shipped name (zero3)")
    p.add_argument("--num_gpus", type=int, default=2, help="ranks per run (CPU ranks when there is no GPU)")
    p.add_argument(
        "--stats_every", type=int, default=None, help="default: the preset's measurements per run, else 5; 0: none"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="after training, evaluate every model downstream (launchers/evaluate.py: perplexity, NIAH, every "
        "quantisation scheme, at the native context and 4x it with YaRN); the report gains the downstream tables",
    )
    p.add_argument(
        "--eval_flags",
        default="",
        help='more launchers/evaluate.py flags for --evaluate, in one string, e.g. "--seeds 2 --samples 10"',
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: study-<preset>)")
    p.add_argument("--out", default=None, help="directory for checkpoints and the report (default: studies/<name>)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.modes = args.modes or ",".join(STUDY_MODES.get(args.preset, ("off", "learned")))
    args.dataset = args.dataset or preset.dataset
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("off", *MODES)]
    if unknown or len(modes) < 2 or "off" not in modes:
        raise UsageError(f"--modes {args.modes}: give 'off' (the baseline) and at least one of {', '.join(MODES)}")
    args.modes = modes
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be >= 1, or leave it out for the preset's")
    if args.stats_every is not None and args.stats_every < 0:
        raise UsageError(f"--stats_every {args.stats_every}: must be >= 0 (0: no statistics)")
    args.steps = preset.max_steps if args.steps is None else args.steps
    if args.stats_every is None:
        args.stats_every = preset.default_stats_every(args.steps) or max(1, args.steps // 5)
    args.experiment = args.experiment or f"study-{args.preset}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.name = f"{args.experiment}-{stamp}"
    args.out = Path(args.out or Path("studies") / args.name)
    args.ds_config = resolve_ds_config(args.ds_config).absolute()  # both runs read the same file from any directory
    return args, extra


def pretrain_command(args: argparse.Namespace, mode: str, extra: list[str]) -> list[str]:
    # DeepSpeed's runner in this interpreter starts the ranks with this interpreter (sys.executable), so they import
    # the vscale_plugin the study imports, not whatever another environment's `deepspeed` on PATH would.
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_gpus),
        "--module", "vscale_plugin.train", "--ds_config", str(args.ds_config), "--preset", args.preset,
        "--max_steps", str(args.steps),
        "--vscale", mode, "--dataset", args.dataset, "--seed", str(args.seed), "--stats_every", str(args.stats_every),
        "--experiment", args.experiment, "--run_name", f"{args.name}-{mode}", "--save_dir", str(args.out / mode),
        *extra,
    ]  # fmt: skip


def evaluate_command(args: argparse.Namespace, run_ids: list[str]) -> list[str]:
    """launchers/evaluate.py on every trained model, on the ranks the training ran on: the paper's contexts (native,
    4x native with YaRN factor 4) unless --eval_flags says otherwise (a later flag wins)."""
    native = PRESETS[args.preset].seq_len
    models = [flag for run_id in run_ids for flag in ("--model", f"runs:/{run_id}")]
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_gpus),
        "--module", "vscale_plugin.apps.evaluate", *models, "--context", f"{native},{4 * native}", "--yarn", "4",
        "--experiment", args.experiment, "--out", str(args.out / "evaluation"), *shlex.split(args.eval_flags),
    ]  # fmt: skip


def _run_id(experiment: str, run_name: str) -> str:
    from mlflow import MlflowClient

    from vscale_plugin.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    if not found:
        raise UsageError(f"run {run_name} is not in MLflow experiment {experiment}; was the tracking store reachable?")
    return found[0].info.run_id


def run(argv: list[str] | None = None) -> int:
    try:
        args, extra = parse_args(argv)
    except ConfigError as err:  # a bad flag (UsageError) or a --ds_config that names no file
        return fail(str(err))
    run_ids = []
    for mode in args.modes:
        command = pretrain_command(args, mode, extra)
        print(f"study: {' '.join(command)}", flush=True)
        code = subprocess.call(command)
        if code != 0:
            fail(f"the {mode} run exited with {code}; see its output above; its files are in {args.out / mode}")
            return code
        try:
            run_ids.append(_run_id(args.experiment, f"{args.name}-{mode}"))
        except UsageError as err:
            return fail(str(err))
    if args.evaluate:
        command = evaluate_command(args, run_ids)
        print(f"study: {' '.join(command)}", flush=True)
        code = subprocess.call(command)
        if code != 0:
            fail(f"the evaluation exited with {code}; see its output above; the trained models are in {args.out}")
            return code
    compare = [sys.executable, "-m", "vscale_plugin.apps.compare", "--experiment", args.experiment,
               "--runs", *run_ids, "--out", str(args.out / "report")]  # fmt: skip
    print(f"study: {' '.join(compare)}", flush=True)
    code = subprocess.call(compare)
    if code == 0:
        print(f"study: report in {args.out / 'report' / 'report.md'}", flush=True)
    return code


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
