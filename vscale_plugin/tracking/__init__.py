"""Experiment tracking for the launcher: an MLflow run logger that batches in the background and spools to disk.

from vscale_plugin.tracking import RunLogger, default_tracking_uri
logger = RunLogger("vscale", run_name="0.1B-learned", tags={"vscale": "learned"}, spool_dir=save_dir / "mlflow-spool")
logger.log_metrics({"train/loss": 3.2}, step=10)     # returns at once
logger.close()

Depends on mlflow only (no torch, no DeepSpeed).
"""

from vscale_plugin.tracking.mlflow_logger import (
    RunLogger,
    TrackingStoreError,
    check_tracking_store,
    default_tracking_uri,
    flatten_params,
)

__all__ = ["RunLogger", "TrackingStoreError", "check_tracking_store", "default_tracking_uri", "flatten_params"]
