"""Gradient-sink statistics: attention sinks, massive activations, gradient sinks (depends on neither the launcher
nor MLflow)."""

from vscale_plugin.stats.collector import StatsCollector, measure

__all__ = ["StatsCollector", "measure"]
