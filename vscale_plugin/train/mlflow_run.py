"""The run's MLflow record (rank 0): the store checked before anything starts, the run opened (or continued on
--resume) with its params and tags, and the gradient profiles as artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from torch import nn

import vscale_plugin
from vscale_plugin.launch.cli import ConfigError
from vscale_plugin.tracking import RunLogger, TrackingStoreError, check_tracking_store, default_tracking_uri
from vscale_plugin.train.config import RunConfig


def check_tracking() -> None:
    """A ConfigError naming stores that work when MLflow cannot open the tracking store."""
    try:
        check_tracking_store(default_tracking_uri())
    except TrackingStoreError as err:
        raise ConfigError(str(err)) from err


def open_run(config: RunConfig, model: nn.Module, run_id: str | None) -> RunLogger:
    """A new MLflow run with the run's params and tags, or the run ``run_id`` continued (params are logged once);
    prints where it is and how to open the store."""
    uri = default_tracking_uri()
    logger = RunLogger(
        experiment=config.experiment,
        run_name=config.run_name,
        run_id=run_id,
        tracking_uri=uri,
        tags={"vscale": config.vscale, "preset": config.preset_tag},
        spool_dir=config.save_dir / "mlflow-spool",
    )
    if run_id is None:
        logger.log_params(
            {
                "model": model.config.to_dict(),
                "recipe": config.recipe.as_dict(),
                "deepspeed": config.ds_config,
                "vscale": config.vscale,
                "vscale_kernel": config.vscale_kernel,
                "dataset": config.dataset,
                "tokenizer": config.tokenizer or "default",
                "save_dir": str(config.save_dir.absolute()),  # where `evaluate.py --model runs:/<id>` finds the model
                "init_from": config.init_from or "",
                "world_size": config.world_size,
                "seed": config.seed,
                "attn_implementation": config.attn_implementation,
                "package_version": vscale_plugin.__version__,
                "git_commit": git_commit(),
            }
        )
    print(f"MLflow: experiment '{config.experiment}', run '{config.run_name}' in {uri}", flush=True)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        print(f"  open it with: mlflow ui --backend-store-uri {uri}", flush=True)
    return logger


def log_profiles(logger: RunLogger, save_dir: Path, step: int, profiles: dict) -> None:
    """The per-position gradient norms the paper plots (positions 0..63, per layer), as a run artifact."""
    path = save_dir / "stats" / f"profiles_step{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, **profiles}))
    logger.log_artifact(path, artifact_path="stats")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
