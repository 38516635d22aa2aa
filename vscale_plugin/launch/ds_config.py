"""DeepSpeed configs: find one (a path, or a config shipped in ``vscale_plugin/ds_configs/`` by name), load it and
fill its ``"auto"`` values from the launcher's flags."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from vscale_plugin.launch.cli import ConfigError

# Package data, so an installed wheel has them too; the checkout's ds_configs/ is a symlink to this directory.
CONFIG_DIR = Path(str(resources.files("vscale_plugin") / "ds_configs"))


def _available() -> str:
    names = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    if not names:
        return f"none: {CONFIG_DIR} holds no config, so this vscale_plugin install is broken; reinstall it"
    shipped = ", ".join(f"ds_configs/{n}" for n in names)
    return f"{shipped} (shipped with vscale_plugin; the bare name, e.g. {Path(names[0]).stem}, works too)"


def resolve_ds_config(value: str | Path) -> Path:
    """The file ``--ds_config value`` means: an existing file, else the shipped config it names as ``zero2``,
    ``zero2.json`` or ``ds_configs/zero2.json`` (the README's spelling, which then works from any directory)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("ds_configs")):
        shipped = CONFIG_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if shipped.is_file():
            return shipped
    raise ConfigError(f"--ds_config {value}: no such file; available: {_available()}, or the path of your own JSON")


def load_ds_config(value: str | Path) -> dict[str, Any]:
    path = resolve_ds_config(value)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--ds_config {value}: not valid JSON ({err.msg} at line {err.lineno}); fix it or use one of {_available()}"
        ) from err
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {value}: expected a JSON object of DeepSpeed settings; see {_available()}")
    _refuse_model_parallelism(config, value)
    return config


def _refuse_model_parallelism(config: dict[str, Any], value: str | Path) -> None:
    # The launchers give every rank batches of its own; AutoTP needs the same batch on every rank of a TP group and
    # Ulysses needs sequence shards, and the statistics are not yet combined over either group (README "Scaling
    # out"). Refused here, before anything is built, instead of DeepSpeed's assertion after the first batch.
    tp = (
        config.get("tensor_parallel", {}).get("autotp_size", 1)
        if isinstance(config.get("tensor_parallel"), dict)
        else 1
    )
    sp = config.get("sequence_parallel_size", 1)
    for key, size in (("tensor_parallel.autotp_size", tp), ("sequence_parallel_size", sp)):
        if isinstance(size, int) and size > 1:
            raise ConfigError(
                f"--ds_config {value}: {key} {size}: the launchers do not run tensor or sequence parallelism yet "
                "(their data path gives every rank its own batches); drop it, or use AutoTP from your own loop or "
                'Trainer, where V-scale follows it (README "Scaling out")'
            )


def _resolve(config: dict, key: str, value: Any, flag: str) -> None:
    """Fill ``config[key]`` when it is "auto" or absent; an explicit, different value is a conflict."""
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise ConfigError(
            f"the DeepSpeed config sets {key}={current!r} but the launcher resolved {flag} to {value!r}; "
            f'set it to "auto" in the config (the launcher fills it) or pass {flag} {current}'
        )


def fill_ds_config(
    config: dict[str, Any],
    micro_batch: int,
    global_batch: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
    pin_memory: bool,
) -> dict[str, Any]:
    """A copy of ``config`` with every "auto" resolved; batch sizes checked for consistency."""
    if micro_batch < 1 or global_batch < 1:
        raise ConfigError(f"--micro_batch ({micro_batch}) and --global_batch ({global_batch}) must be positive")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"--global_batch {global_batch} is not a multiple of --micro_batch {micro_batch} x {world_size} ranks "
            f"= {per_step}; choose a global batch that is (e.g. {max(per_step, global_batch // per_step * per_step)})"
        )
    filled = copy.deepcopy(config)
    _resolve(filled, "train_micro_batch_size_per_gpu", micro_batch, "--micro_batch")
    _resolve(
        filled, "gradient_accumulation_steps", global_batch // per_step, "--global_batch / (--micro_batch x ranks)"
    )
    _resolve(filled, "train_batch_size", global_batch, "--global_batch")
    _resolve(filled, "gradient_clipping", grad_clip, "the preset's clipping")
    precision = filled.setdefault("bf16", {"enabled": "auto"})
    if precision.get("enabled", "auto") == "auto":
        precision["enabled"] = bf16
    if filled.get("fp16", {}).get("enabled") == "auto":
        filled["fp16"]["enabled"] = False
    offload = filled.get("zero_optimization", {}).get("offload_optimizer")
    if offload and not pin_memory:
        offload["pin_memory"] = False  # pinned host memory needs a GPU
    unfilled = list(_autos(filled))
    if unfilled:
        raise ConfigError(
            f'the DeepSpeed config has "{unfilled[0]}": "auto", which the launcher does not fill; give a value'
        )
    return filled


def _autos(config: Any, prefix: str = ""):
    if isinstance(config, dict):
        for k, v in config.items():
            yield from _autos(v, f"{prefix}{k}.")
    elif config == "auto":
        yield prefix.rstrip(".")
