"""Gradient-sink statistics: attention sinks, massive activations, gradient sinks, quantisation readiness (depends on
neither the launcher nor MLflow)."""

from vscale_plugin.stats.collector import StatsCollector, causal_lm_labels, measure

__all__ = ["StatsCollector", "causal_lm_labels", "measure"]
