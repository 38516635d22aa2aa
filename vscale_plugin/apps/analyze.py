"""``launchers/analyze.py``: the gradient-sink statistics of an existing model, post hoc, as the paper analyses
Qwen2.5, Llama-3.1 and GLM-4: one combined gradient over ``--batches`` batches, logged to MLflow, printed per layer.

Models come from the hub or a local directory (``vsp.from_pretrained``, V-scale restored), or from a checkpoint of
``launchers/pretrain.py`` (its ``--save_dir``). Under the ``deepspeed``/``torchrun`` launchers each rank reads different
batches and the statistics are combined over ranks; with ``--ds_config`` a ZeRO-3 config partitions large models, and
``"sequence_parallel_size": N`` (DeepSpeed Ulysses) measures long contexts: the N ranks of a group read the same
batches and each holds T / N positions of every sequence, as ``launchers/pretrain.py`` trains them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vscale_plugin
from vscale_plugin.data import TOKENIZER_CACHE, DataError, build_tokenizer, check_dataset, open_batches, padded_batches
from vscale_plugin.data.tokenizer import check_fits
from vscale_plugin.evaluate.models import is_training_checkpoint, load_pretrained, load_training_checkpoint, read_record
from vscale_plugin.launch.cli import ConfigError, OneLineParser, UsageError, check_model_config, fail
from vscale_plugin.launch.distributed import exit_after_distributed, rank0_first, run_launcher
from vscale_plugin.launch.ds_config import (
    check_sequence_parallel_ranks,
    fill_ds_config,
    load_ds_config,
    sequence_parallel_size,
    tensor_parallel_size,
)
from vscale_plugin.stats import StatsCollector, causal_lm_labels

TABLE = (
    ("sink", "as/sink_rate"),
    ("mass", "as/mass"),
    ("R_GS", "gs/ratio"),
    ("|h_out| 0", "ma/h_out/tok0"),
    ("|h_out| rest", "ma/h_out/rest"),
    ("|mlp| 0", "ma/mlp_out/tok0"),
    ("|v| 0", "ma/v/tok0"),
    ("g_in 0", "gs/grad_in/tok0"),
    ("g_in rest", "gs/grad_in/rest"),
    ("g_v 0", "gs/v/tok0"),
    ("kurt h_out", "qr/kurtosis/h_out"),  # quantisation readiness: outlier channels of the residual stream
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="launchers/analyze.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="HF model name or directory, or a launchers/pretrain.py --save_dir (DeepSpeed checkpoint)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="'smoke', 'c4', a PATH or bigram_backcopy[:...], as for pretrain.py (default: a training checkpoint's "
        "own, else smoke)",
    )
    p.add_argument(
        "--split",
        default="eval",
        choices=["eval", "train"],
        help="eval: C4's validation split or the held-out slice of local data",
    )
    p.add_argument("--tokenizer", default=None, help="default: the model's own (or the checkpoint's run)")
    p.add_argument("--batches", type=int, default=8, help="batches per rank, combined into one gradient")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    p.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="tokens per sequence (with --padding: at most; default: a training checkpoint's own, else 512)",
    )
    p.add_argument(
        "--padding",
        default="none",
        choices=["none", "left", "right"],
        help="none: documents packed into full windows, as in pretraining; left/right: one document per sequence "
        "(its first --seq_len tokens), padded to the longest of its batch, measured from its first token",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument(
        "--ds_config",
        "--deepspeed_config",
        dest="ds_config",
        default=None,
        help="optional DeepSpeed config (ZeRO-3 partitions models too large for one device)",
    )
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    p.add_argument("--experiment", default="vscale-plugin-analysis")
    p.add_argument("--run_name", default=None)
    p.add_argument("--out", default=None, help="also write the metrics and profiles as JSON here")
    args = p.parse_args(argv)  # fmt: skip
    for flag in ("batches", "batch_size", "seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.run_name is None:
        args.run_name = f"analyze-{Path(args.model).name or args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def load_model(args: argparse.Namespace, dtype: torch.dtype, ds_config: dict | None) -> torch.nn.Module:
    if is_training_checkpoint(args.model):
        # Consolidated on the host first; deepspeed.initialize partitions it afterwards under ZeRO-3.
        return load_training_checkpoint(args.model, dtype, args.attn_implementation)
    keep = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers loads straight into ZeRO-3 partitions while it lives
    model = load_pretrained(args.model, dtype, args.attn_implementation)
    del keep
    return model


def _tokenizer_spec(args: argparse.Namespace) -> tuple[str | None, str]:
    """(tokenizer spec, dataset the tokenizer default belongs to): a training checkpoint recorded its own."""
    if args.tokenizer is not None:
        return args.tokenizer, args.dataset
    if is_training_checkpoint(args.model):
        recorded = read_record(args.model)
        return recorded.get("tokenizer"), recorded.get("dataset", args.dataset)
    return args.model, args.dataset


def _defaults_from_run(args: argparse.Namespace) -> None:
    """--dataset and --seq_len left out: a training checkpoint's own (its data, its context), else smoke and 512."""
    recorded = read_record(args.model) if is_training_checkpoint(args.model) else {}
    if args.dataset is None:
        args.dataset = recorded.get("dataset", "smoke")
    if args.seq_len is None:
        args.seq_len = recorded.get("settings", {}).get("seq_len", 512)


def analyze(args: argparse.Namespace, rank: int, world_size: int) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    ds_config, sp = None, 1
    if not Path(args.model).exists() and args.model.startswith((".", "/")):
        raise UsageError(f"--model {args.model}: no such directory; give a HF model directory or hub name, or a "
                         "launchers/pretrain.py --save_dir")  # fmt: skip
    _defaults_from_run(args)
    if args.ds_config is not None:
        raw = load_ds_config(args.ds_config, sequence_parallel=True)
        sp = sequence_parallel_size(raw, args.ds_config)
        check_sequence_parallel_ranks(sp, tensor_parallel_size(raw, args.ds_config), world_size, args.seq_len)
        if sp > 1 and args.padding != "none":
            raise UsageError(f"--padding {args.padding} with sequence_parallel_size {sp}: Ulysses drops the attention "
                             "mask, so pads would be attended to; measure packed windows (--padding none)")  # fmt: skip
        ds_config = fill_ds_config(
            raw, micro_batch=args.batch_size, global_batch=args.batch_size * world_size // sp * args.batches,
            world_size=world_size, grad_clip=1.0, bf16=dtype == torch.bfloat16, pin_memory=gpu,
        )  # fmt: skip
    # The model first: a directory that is no model must be named as such, not blamed on the tokenizer read from it.
    check_model_config(args.model, "--model", args.seq_len, needs_registry=False, needs_statistics=True)
    spec, tokenizer_dataset = _tokenizer_spec(args)
    tokenizer = rank0_first(build_tokenizer, spec, tokenizer_dataset, TOKENIZER_CACHE)
    check_dataset(args.dataset)
    model = load_model(args, dtype, ds_config)
    check_fits(
        tokenizer, model.config.vocab_size, f"--model {args.model}", "pass the model's tokenizer with --tokenizer"
    )
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    target: Any = model.to(device) if ds_config is None else None
    shards = None
    if ds_config is not None:
        import deepspeed

        mpu = _ulysses(model, args, sp, world_size, ds_config)
        # engine.backward needs an optimiser (one ZeRO supports); it never steps, so it allocates no state.
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        target, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
        if sp > 1:
            from vscale_plugin.train.sequence_parallel import SequenceShards

            group = target.seq_parallel_group
            shards = SequenceShards(group, sp, dist.get_rank(group), target.zero_optimization_stage())
    batches = _batches(args, tokenizer, rank // sp, world_size // sp)  # an SP group's ranks read the same batches
    collector = StatsCollector(target, every=1)
    with collector.capture(0):
        for index in range(args.batches):
            try:
                ids, mask = (t.to(device) if t is not None else None for t in next(batches))
            except StopIteration:
                raise DataError(
                    f"--dataset {args.dataset} ({args.split}) has fewer than --batches {args.batches} batches of "
                    f"{args.batch_size} x {args.seq_len} tokens per rank; lower them"
                ) from None
            if shards is None:
                loss = target(input_ids=ids, attention_mask=mask, labels=causal_lm_labels(ids, mask)).loss
            else:  # this rank's positions of every sequence, the loss combined over the SP group
                loss = shards.loss(target, ids)
            if ds_config is None:
                (loss / args.batches).backward()  # the mean gradient over the batches, as accumulation would give
            else:
                # The engine scales by 1/gradient_accumulation_steps itself. Its step() never runs here (no update),
                # so the last batch is marked as the accumulation boundary, where gradients are reduced and read.
                target.set_gradient_accumulation_boundary(index == args.batches - 1)
                target.backward(loss)
    return {"metrics": collector.result(), "profiles": collector.profiles(), "model": model, "sequence_parallel": sp}


def _ulysses(model: torch.nn.Module, args: argparse.Namespace, sp: int, world_size: int, ds_config: dict):
    """Ulysses in place of the model's attention function (its ``mpu``), after the model checks; None without SP."""
    if sp == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from vscale_plugin.hf.sequence_parallel import check_sequence_parallel

    try:
        check_sequence_parallel(model, sp, args.attn_implementation, world_size, ds_config)
    except ValueError as err:
        raise ConfigError(f"{err} (sequence_parallel_size in --ds_config, --attn_implementation)") from err
    return UlyssesSPAttentionHF.register_with_transformers(model, args.attn_implementation, sp,
                                                           micro_batch_size=args.batch_size, seq_length=args.seq_len,
                                                           seq_length_is_variable=False)  # fmt: skip


def _batches(args: argparse.Namespace, tokenizer, rank: int, world_size: int):
    """(input_ids, attention_mask or None) per batch of this rank: packed windows, or padded documents."""
    data = open_batches(args.dataset, tokenizer, args.seq_len, args.batch_size, rank=rank, world_size=world_size,
                        seed=args.seed, split=args.split)  # fmt: skip
    if args.padding == "none":
        return ((ids, None) for ids in data)
    return padded_batches(data.documents(), args.batch_size, args.seq_len, args.padding, pad_id=tokenizer.eos_id)


def format_table(metrics: dict[str, float], layers: int) -> str:
    header = ["layer", *[name for name, _ in TABLE]]
    rows = [header]
    for layer in range(layers):
        tag = f"L{layer:02d}"
        rows.append([tag, *[_fmt(metrics.get(f"{key}/{tag}")) for _, key in TABLE]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    summary = (
        f"median R_GS {_fmt(metrics.get('gs/ratio/median'))}, "
        f"mean sink rate {_fmt(metrics.get('as/sink_rate/mean'))}, "
        f"max token-0 |h_out| {_fmt(metrics.get('ma/h_out/tok0/max'))}, "
        f"|mlp_out| {_fmt(metrics.get('ma/mlp_out/tok0/max'))}, "
        f"max h_out kurtosis {_fmt(metrics.get('qr/kurtosis/h_out/max'))}"
    )
    return "\n".join([*lines, summary])


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def run(argv: list[str] | None = None) -> int:
    return run_launcher(parse_args, _run, argv)


def _run(args, rank: int, world_size: int) -> int:
    try:
        out = analyze(args, rank, world_size)
    except (ConfigError, DataError) as err:
        return fail(str(err))
    metrics, profiles, model = out["metrics"], out["profiles"], out["model"]
    if rank == 0:
        print(format_table(metrics, model.config.num_hidden_layers), flush=True)
        _log(args, metrics, profiles, model, world_size, out["sequence_parallel"])
    if dist.is_initialized():
        dist.barrier()
    return 0


def _log(args, metrics: dict[str, float], profiles: dict[str, Any], model, world_size: int, sp: int) -> None:
    from vscale_plugin.tracking import RunLogger, default_tracking_uri

    vscale = (getattr(model.config, "vscale", None) or {}).get("mode", "off")
    logger = RunLogger(args.experiment, run_name=args.run_name, tracking_uri=default_tracking_uri(),
                       tags={"analysis": "true", "vscale": vscale, "model": args.model},
                       spool_dir=Path(args.out or ".") / "mlflow-spool")  # fmt: skip
    logger.log_params({"model_name": args.model, "dataset": args.dataset, "split": args.split, "padding": args.padding,
                       "batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "world_size": world_size, "sequence_parallel_size": sp,
                       "vscale": vscale, "package_version": vscale_plugin.__version__,
                       "model": model.config.to_dict()})  # fmt: skip
    logger.log_metrics(metrics, step=0)
    out_dir = Path(args.out) if args.out else Path("analysis") / args.run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "profiles.json").write_text(json.dumps(profiles))
    logger.log_artifact(out_dir / "metrics.json", artifact_path="stats")
    logger.log_artifact(out_dir / "profiles.json", artifact_path="stats")
    logger.close()
    print(f"MLflow: experiment '{args.experiment}', run '{args.run_name}' in {default_tracking_uri()}; JSON in "
          f"{out_dir}", flush=True)  # fmt: skip


def main() -> None:
    exit_after_distributed(run())


if __name__ == "__main__":
    main()
