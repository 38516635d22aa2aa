"""Pretraining under DeepSpeed, the library side of ``launchers/pretrain.py``, one concern per module: ``cli``
(flags -> ``config.RunConfig``), ``recipe`` (presets), ``model`` (build, seeded init, V-scale), ``engine``
(optimiser, ``deepspeed.initialize``), ``schedule`` (lr), ``checkpoint``, ``mlflow_run``, ``loop``, ``throughput``;
``main.run`` strings them together."""
