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


def load_ds_config(value: str | Path, tensor_parallel: bool = False, sequence_parallel: bool = False) -> dict[str, Any]:
    """The DeepSpeed config ``--ds_config value`` names. Tensor parallelism (``tensor_parallel.autotp_size`` > 1) and
    Ulysses sequence parallelism (``sequence_parallel_size`` > 1) are refused unless ``tensor_parallel`` /
    ``sequence_parallel``: the launcher whose data path feeds a tensor-parallel group the same batches and a
    sequence-parallel group shards of them (``launchers/pretrain.py``) passes them."""
    path = resolve_ds_config(value)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--ds_config {value}: not valid JSON ({err.msg} at line {err.lineno}); fix it or use one of {_available()}"
        ) from err
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {value}: expected a JSON object of DeepSpeed settings; see {_available()}")
    _refuse_model_parallelism(config, value, tensor_parallel, sequence_parallel)
    return config


def _refuse_model_parallelism(
    config: dict[str, Any], value: str | Path, tensor_parallel: bool, sequence_parallel: bool
) -> None:
    # Ulysses needs sequence shards, and AutoTP the same batch on every rank of a TP group, which a launcher's data
    # path must give (launchers/pretrain.py does for both). Refused here, before anything is built, instead of
    # DeepSpeed's assertion after the first batch.
    tp = tensor_parallel_size(config, value)  # a malformed size fails here too
    sp = sequence_parallel_size(config, value)
    if sp > 1 and not sequence_parallel:
        raise ConfigError(
            f"--ds_config {value}: sequence_parallel_size {sp}: this launcher does not run sequence parallelism "
            "(its data path gives every rank its own batches); drop it, or train with Ulysses from "
            'launchers/pretrain.py (README "Scaling out")'
        )
    if tp > 1 and not tensor_parallel:
        raise ConfigError(
            f"--ds_config {value}: tensor_parallel.autotp_size {tp}: this launcher does not run tensor parallelism "
            "yet (its data path gives every rank its own batches); drop it, or use AutoTP from launchers/pretrain.py, "
            'your own loop or Trainer, where V-scale follows it (README "Scaling out")'
        )


def sequence_parallel_size(config: dict[str, Any], value: str | Path = "") -> int:
    """The DeepSpeed Ulysses sequence-parallel size of a DeepSpeed config (``"sequence_parallel_size": N``); 1
    without it."""
    size = config.get("sequence_parallel_size", 1)
    if size is None:
        return 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f'--ds_config {value}: "sequence_parallel_size" must be a whole number of ranks >= 1 (got '
            f"{json.dumps(size)}); e.g. ds_configs/zero3_sp2.json"
        )
    return size


def check_sequence_parallel_ranks(sp: int, tp: int, world_size: int, seq_len: int) -> None:
    """A ConfigError naming every reason Ulysses of ``sp`` ranks per sequence cannot split this run: ``sp`` together
    with AutoTP (``tp`` > 1), not dividing the ranks, or not dividing ``seq_len``. The model's side (attention, heads,
    sliding windows, DeepSpeed's version) is :func:`vscale_plugin.hf.sequence_parallel.check_sequence_parallel`'s."""
    if sp == 1:
        return
    problems = []
    if tp > 1:
        problems.append(
            f"sequence_parallel_size {sp} with tensor_parallel.autotp_size {tp}: the launcher runs one of Ulysses "
            "sequence parallelism and AutoTP, not both (their groups are not combined, nor verified together); "
            "drop one of them from the --ds_config"
        )
    if world_size % sp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        problems.append(
            f"sequence_parallel_size {sp} does not divide the {world_size} ranks: each sequence-parallel group is "
            f"{sp} ranks; launch a multiple of {sp} ranks (deepspeed --num_gpus {sp * max(1, world_size // sp)}) "
            f"or set sequence_parallel_size to one of {divisors}"
        )
    if seq_len % sp:
        problems.append(
            f"--seq_len {seq_len} is not divisible by sequence_parallel_size {sp}: each of the {sp} ranks holds "
            f"seq_len / {sp} positions of every sequence; pass --seq_len {max(sp, seq_len // sp * sp)}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def tensor_parallel_size(config: dict[str, Any], value: str | Path = "") -> int:
    """The AutoTP size of a DeepSpeed config (``"tensor_parallel": {"autotp_size": N}``); 1 without it."""
    section = config.get("tensor_parallel")
    if section is None:
        return 1
    size = section.get("autotp_size", 1) if isinstance(section, dict) else None
    if size is None:
        size = 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(
            f'--ds_config {value}: "tensor_parallel" must be {{"autotp_size": N}} with N a whole number of ranks '
            f"(got {json.dumps(section)}); e.g. ds_configs/zero1_tp2.json"
        )
    return max(size, 1)  # DeepSpeed reads 0 as off


# The first DeepSpeed releases with AutoTP training, and with AutoTP training under ZeRO-3.
AUTOTP_SINCE = "0.16.4"
AUTOTP_ZERO3_SINCE = "0.19.4"


def check_tensor_parallel(tp: int, world_size: int, zero_stage: int, deepspeed_version: str | None = None) -> None:
    """A ConfigError when AutoTP of ``tp`` ranks cannot run here: ``tp`` not dividing the ranks, or a DeepSpeed too
    old for AutoTP training (or for AutoTP under ZeRO-3). ``deepspeed_version``: the installed one when None."""
    if tp == 1:
        return
    if world_size % tp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"tensor_parallel.autotp_size {tp} does not divide the {world_size} ranks: each tensor-parallel group "
            f"is {tp} ranks; launch a multiple of {tp} ranks (deepspeed --num_gpus {tp * max(1, world_size // tp)}) "
            f"or set autotp_size to one of {divisors}"
        )
    from packaging.version import Version

    if deepspeed_version is None:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    installed = Version(deepspeed_version)
    if installed < Version(AUTOTP_SINCE):
        raise ConfigError(
            f"tensor_parallel.autotp_size {tp}: AutoTP training needs DeepSpeed >= {AUTOTP_SINCE}, this is "
            f"{deepspeed_version}; pip install 'deepspeed>={AUTOTP_SINCE}', or drop tensor_parallel"
        )
    if zero_stage == 3 and installed < Version(AUTOTP_ZERO3_SINCE):
        raise ConfigError(
            f"tensor_parallel.autotp_size {tp} with ZeRO-3: AutoTP under ZeRO-3 needs DeepSpeed >= "
            f"{AUTOTP_ZERO3_SINCE}, this is {deepspeed_version}; pip install 'deepspeed>={AUTOTP_ZERO3_SINCE}', or use "
            "ZeRO-1/2 (e.g. ds_configs/zero1_tp2.json)"
        )


def check_kv_heads(tp: int, kv_heads: int, model: str) -> None:
    """A ConfigError when ``tp`` ranks cannot each compute whole KV heads of ``model`` (``kv_heads`` of them)."""
    if tp > 1 and kv_heads % tp:
        divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
        raise ConfigError(
            f"tensor_parallel.autotp_size {tp} does not divide the {kv_heads} KV heads of {model}: every "
            f"tensor-parallel rank needs whole KV heads (V-scale's norm is per head); set autotp_size to one of "
            f"{divisors}"
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
    """A copy of ``config`` with every "auto" resolved; batch sizes checked for consistency.

    Under tensor parallelism (``tensor_parallel.autotp_size`` N > 1) the ``world_size`` ranks are ``world_size / N``
    data-parallel ranks: the ranks of one tensor-parallel group train on the same micro-batches, so ``global_batch``
    is ``micro_batch`` x accumulation steps x ``world_size / N``. ``train_batch_size`` is then left out for DeepSpeed
    to derive: DeepSpeed 0.19.8 checks it against all ranks as data-parallel when the engine is built, and under
    ZeRO-3 again against the data-parallel ranks alone, so no single value passes both.

    Under Ulysses sequence parallelism (``sequence_parallel_size`` N > 1) likewise: the N ranks of a
    sequence-parallel group share each micro-batch (each holds a 1/N shard of its positions), so ``global_batch`` is
    ``micro_batch`` x accumulation steps x ``world_size / N``; DeepSpeed counts ``train_batch_size`` over the
    ``world_size / N`` data-parallel ranks too (its config divides the world by the SP size), so it is filled."""
    if micro_batch < 1 or global_batch < 1:
        raise ConfigError(f"--micro_batch ({micro_batch}) and --global_batch ({global_batch}) must be positive")
    tp = tensor_parallel_size(config)
    sp = sequence_parallel_size(config)
    data_parallel = world_size // (tp * sp)
    per_step = micro_batch * data_parallel
    ranks = f"{world_size} ranks"
    if tp > 1:
        ranks = f"{data_parallel} data-parallel ranks ({world_size} ranks / autotp_size {tp})"
    elif sp > 1:
        ranks = f"{data_parallel} data-parallel ranks ({world_size} ranks / sequence_parallel_size {sp})"
    if global_batch % per_step:
        raise ConfigError(
            f"--global_batch {global_batch} is not a multiple of --micro_batch {micro_batch} x {ranks} "
            f"= {per_step}; choose a global batch that is (e.g. {max(per_step, global_batch // per_step * per_step)})"
        )
    filled = copy.deepcopy(config)
    _resolve(filled, "train_micro_batch_size_per_gpu", micro_batch, "--micro_batch")
    _resolve(
        filled,
        "gradient_accumulation_steps",
        global_batch // per_step,
        "--global_batch / (--micro_batch x data-parallel ranks)",
    )
    if tp == 1:
        _resolve(filled, "train_batch_size", global_batch, "--global_batch")
    elif filled.pop("train_batch_size", "auto") != "auto":
        raise ConfigError(
            f'the DeepSpeed config sets train_batch_size under tensor_parallel.autotp_size {tp}; set it to "auto" '
            "(or leave it out) and give the batch as --global_batch (sequences per optimiser step over the "
            "data-parallel ranks): DeepSpeed counts train_batch_size over all ranks under ZeRO-1/2 and over the "
            "data-parallel ranks under ZeRO-3, so the launcher leaves it to DeepSpeed"
        )
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
