"""``launchers/evaluate.py`` (``vsp-evaluate``): the paper's downstream evaluation of trained models, side by side
(SPEC section 7): perplexity and bits per byte, needle-in-a-haystack retrieval at the native context and extended
with YaRN, each under simulated post-training quantisation; lm-evaluation-harness tasks where it is installed.

    python launchers/evaluate.py --model checkpoints/off --model checkpoints/learned
    python launchers/evaluate.py --model runs:/<run id> --model runs:/<run id> --context 1024,4096 --yarn 4
    deepspeed --num_gpus 8 launchers/evaluate.py --model ... --model ...     # the cells spread over the ranks

``--model`` is a directory written by save_pretrained (or a hub name), a ``launchers/pretrain.py --save_dir``, or
``runs:/<run id>`` of a training run in MLflow. Writes results.json, report.md and figures to --out, and one MLflow
run per model tagged with the training run it evaluates.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vscale_plugin
from vscale_plugin.data import DataError
from vscale_plugin.evaluate import quant
from vscale_plugin.evaluate.models import ModelSource, model_source
from vscale_plugin.evaluate.report import mlflow_metrics, write_report, write_results
from vscale_plugin.evaluate.runner import TASKS, Grid, Target, evaluate
from vscale_plugin.launch.cli import ConfigError, OneLineParser, UsageError, fail
from vscale_plugin.launch.distributed import exit_after_distributed, run_launcher

RUN_PREFIX = "runs:/"
DEFAULT_EXPERIMENT = "vscale-plugin-evaluation"


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(part) for part in _list(text)]
    except ValueError as err:
        raise UsageError(f"--{flag} {text}: give comma-separated whole numbers, e.g. --{flag} 1024,4096") from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="launchers/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="an HF directory or hub name, a pretrain.py --save_dir, or runs:/<run id>; repeat for each "
                   "model (the baseline and its V-scale twin)")  # fmt: skip
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--quant", default=",".join(quant.SCHEMES),
                   help=f"comma-separated schemes: {', '.join(quant.SCHEMES + quant.EXTRA_SCHEMES)}")  # fmt: skip
    p.add_argument("--context", default=None, help="comma-separated contexts in tokens (default: each model's native)")
    p.add_argument("--yarn", type=float, default=None, help="YaRN factor for contexts beyond the native one (4)")
    p.add_argument("--seeds", type=int, default=5, help="NIAH seeds; tables show mean ± std")
    p.add_argument("--samples", type=int, default=20, help="NIAH samples per (task, context, seed)")
    p.add_argument("--calib", type=int, default=32, help="training sequences the static schemes calibrate on")
    p.add_argument("--ppl_windows", type=int, default=64, help="held-out windows of the context for perplexity")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward (perplexity, NIAH, calibration)")
    p.add_argument("--dataset", default=None, help="smoke, c4 or a PATH (default: the training run's, else smoke)")
    p.add_argument("--tokenizer", default=None, help="default: the model's own, or its training run's")
    p.add_argument("--lm_eval_tasks", default="",
                   help="lm-evaluation-harness tasks, comma-separated (pip install 'vscale-plugin[eval]')")  # fmt: skip
    p.add_argument("--lm_eval_limit", type=int, default=None, help="items per lm-eval task, at most")
    p.add_argument("--out", default=None, help="directory for results.json and report.md (default: evaluations/...)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment of the evaluation runs")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    args.tasks, args.quant = _list(args.tasks), _list(args.quant)
    args.context = _ints("context", args.context) if args.context else None
    args.lm_eval_tasks = _list(args.lm_eval_tasks)
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise UsageError(f"--lm_eval_limit {args.lm_eval_limit}: must be >= 1")
    args.grid = Grid(tasks=args.tasks, quants=args.quant, contexts=args.context, yarn=args.yarn, seeds=args.seeds,
                     samples=args.samples, calib=args.calib, ppl_windows=args.ppl_windows, batch_size=args.batch_size,
                     dataset=args.dataset, lm_eval_tasks=args.lm_eval_tasks,
                     lm_eval_limit=args.lm_eval_limit)  # fmt: skip
    args.name = time.strftime("eval-%Y%m%d-%H%M%S")
    args.out = Path(args.out or Path("evaluations") / args.name)
    return args


def resolve(spec: str, tokenizer: str | None) -> ModelSource:
    """The source a ``--model`` names; ``runs:/<id>`` is looked up in MLflow (its --save_dir and tokenizer)."""
    if not spec.startswith(RUN_PREFIX):
        return model_source(spec, tokenizer)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from vscale_plugin.tracking import default_tracking_uri

    run_id = spec[len(RUN_PREFIX) :].strip("/")
    uri = default_tracking_uri()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise UsageError(f"--model {spec}: no such run in the MLflow store {uri} ({str(err).splitlines()[0]}); "
                         "give the id of a pretrain.py run (mlflow ui shows it), or set MLFLOW_TRACKING_URI to its "
                         "store") from err  # fmt: skip
    save_dir = run.data.params.get("save_dir")
    if not save_dir:
        raise UsageError(f"--model {spec}: the run records no save_dir (it predates this version, or is not a "
                         "pretrain.py run); give its --save_dir directly")  # fmt: skip
    recorded = run.data.params.get("tokenizer")
    if tokenizer is None and recorded != "default":
        tokenizer = recorded
    source = model_source(save_dir, tokenizer, label=run.info.run_name)
    source.training_run_id = run_id
    return source


def _unique_labels(sources: list[ModelSource]) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        seen[source.label] = seen.get(source.label, 0) + 1
        if seen[source.label] > 1:
            source.label = f"{source.label}#{seen[source.label]}"


def run(argv: list[str] | None = None) -> int:
    return run_launcher(parse_args, _run, argv)


def _run(args: argparse.Namespace, rank: int, world_size: int) -> int:
    gpu = torch.cuda.is_available()
    if not gpu and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks of one machine share its cores: each taking them all makes decoding's many small ops wait on
        # each other's threads (a smoke-model decoding step: 5 ms on one thread, 0.5 s on two beside another job).
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    try:
        sources = [resolve(spec, args.tokenizer) for spec in args.model]
        _unique_labels(sources)
        targets = [Target.load(source, args.dataset, device=device, dtype=dtype) for source in sources]
        records, skipped = evaluate(targets, args.grid, rank, world_size)
    except (ConfigError, DataError, quant.QuantError) as err:
        return fail(str(err), rank)
    if rank == 0:
        _write(args, targets, records, skipped, world_size)
    if dist.is_initialized():
        dist.barrier()
    return 0


def _settings(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    grid = args.grid
    return {"tasks": ",".join(grid.tasks), "quant": ",".join(grid.quants),
            "contexts": ",".join(map(str, grid.contexts)) if grid.contexts else "native", "yarn": grid.yarn or "none",
            "seeds": grid.seeds, "samples": grid.samples, "calib": grid.calib, "ppl_windows": grid.ppl_windows,
            "dataset": args.dataset or "the training run's", "lm_eval_tasks": ",".join(grid.lm_eval_tasks) or "none",
            "world_size": world_size}  # fmt: skip


def _write(args, targets: list[Target], records, skipped, world_size: int) -> None:
    from vscale_plugin.tracking import RunLogger, default_tracking_uri

    settings = _settings(args, world_size)
    sources = {t.label: f"{t.source.path} (V-scale {t.vscale}; dataset {t.dataset}; native context {t.native})"
               for t in targets}  # fmt: skip
    results = write_results(records, args.out)
    report = write_report(records, skipped, args.out, settings, sources, schemes=args.grid.quants)
    print(report.read_text(), flush=True)
    uri = default_tracking_uri()
    for target in targets:
        tags = {"evaluation": "true", "vscale": target.vscale, "model": target.source.path}
        if target.source.training_run_id:
            tags["source_run"] = target.source.training_run_id
        logger = RunLogger(args.experiment, run_name=f"{args.name}-{target.label}", tracking_uri=uri, tags=tags,
                           spool_dir=args.out / "mlflow-spool")  # fmt: skip
        logger.log_params({**settings, "model": target.source.path, "label": target.label, "vscale": target.vscale,
                           "native_context": target.native, "package_version": vscale_plugin.__version__})  # fmt: skip
        logger.log_metrics(mlflow_metrics(records, target.label), step=0)
        logger.log_artifact(results, artifact_path="evaluation")
        for path in sorted(args.out.glob("*.md")) + sorted(args.out.glob("*.png")):
            logger.log_artifact(path, artifact_path="evaluation")
        logger.close()
    print(f"evaluate: results in {args.out}; MLflow experiment '{args.experiment}' in {uri}", flush=True)


def main() -> None:
    exit_after_distributed(run())


if __name__ == "__main__":
    main()
