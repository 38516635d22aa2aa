"""Helpers for the project's own tests (multi-rank runs through the real ``deepspeed`` launcher)."""

from __future__ import annotations


def metric_history(client, run_id: str, key: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of one metric of an MLflow run; a step logged twice is an error (a resume that repeated
    steps, or two ranks logging)."""
    entries = client.get_metric_history(run_id, key)
    steps = [m.step for m in entries]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"{key} logged twice at some steps: {sorted(steps)}")
    return {m.step: m.value for m in entries}
