"""Pretraining under DeepSpeed (the launcher's library side): recipe presets, DeepSpeed configs, the loop."""
