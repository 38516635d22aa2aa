"""V-scale and the gradient-sink statistics inside pipelines that are not ours (SPEC section 8).

``vscale_plugin.integrations.transformers``: ``GradientSinkCallback`` for ``transformers.Trainer`` (and TRL's
``SFTTrainer``), ``VScaleTrainer`` and ``without_vscale_decay`` to keep theta out of weight decay. A hand-written
Accelerate loop needs no integration: ``StatsCollector(model).start(step)`` / ``stop()`` (see ``examples/``).
"""
