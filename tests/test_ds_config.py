"""The DeepSpeed configs ship inside the package and are found by name from any directory (issue 11)."""

import json
import re
from pathlib import Path

import pytest

from vscale_plugin.launch.cli import ConfigError
from vscale_plugin.launch.ds_config import CONFIG_DIR, fill_ds_config, load_ds_config, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.json"))


def test_the_checkout_ds_configs_is_a_symlink_to_the_shipped_configs():
    # One copy: README's `--ds_config ds_configs/zero2.json` reads the very files the wheel carries.
    assert (REPO / "ds_configs").is_symlink()
    assert (REPO / "ds_configs").resolve() == CONFIG_DIR.resolve()
    assert SHIPPED == [
        "zero1.json", "zero1_tp2.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_sp2.json"
    ]  # fmt: skip


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_fills_for_two_ranks(name):
    filled = fill_ds_config(load_ds_config(name, tensor_parallel=True, sequence_parallel=True), micro_batch=2,
                            global_batch=8, world_size=2, grad_clip=1.0, bf16=False, pin_memory=False)  # fmt: skip
    if "_tp2" in name:  # one data-parallel rank: 4 micro-batches per step; DeepSpeed derives train_batch_size
        assert "train_batch_size" not in filled and filled["gradient_accumulation_steps"] == 4
    elif "_sp2" in name:  # one data-parallel rank of 2 SP ranks: 4 micro-batches per step, 8 sequences
        assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 4
    else:
        assert filled["train_batch_size"] == 8 and filled["gradient_accumulation_steps"] == 2
    assert filled["zero_optimization"]["stage"] == int(name[len("zero")])


@pytest.mark.parametrize("spelling", ["zero3", "zero3.json", "ds_configs/zero3.json"])
def test_a_shipped_name_resolves_outside_the_checkout(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config(spelling) == CONFIG_DIR / "zero3.json"
    assert load_ds_config(spelling) == json.loads((CONFIG_DIR / "zero3.json").read_text())


def test_an_existing_file_wins_over_the_shipped_config_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("zero2.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert load_ds_config("zero2.json") == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("value", ["zero9", "ds_configs/zero9.json", "elsewhere/zero2.json"])
def test_a_missing_config_is_an_error_listing_names_that_resolve(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(value)
    message = str(err.value)
    assert message.startswith(f"--ds_config {value}: no such file; available: ") and "\n" not in message
    listed = re.findall(r"ds_configs/[\w.]+\.json", message.split("available: ")[1])
    assert sorted(Path(item).name for item in listed) == SHIPPED
    for item in listed:  # what the error offers really works, here, away from the checkout
        assert resolve_ds_config(item).read_bytes() == (CONFIG_DIR / Path(item).name).read_bytes()


@pytest.mark.parametrize(
    ("extra", "key", "tensor_parallel"),
    [
        # launchers/analyze.py: its data path gives every rank its own batches (launchers/pretrain.py runs AutoTP and
        # Ulysses, passing sequence_parallel=True too)
        ({"tensor_parallel": {"autotp_size": 2}}, "tensor_parallel.autotp_size 2: this launcher does not run", False),
        ({"sequence_parallel_size": 2}, "sequence_parallel_size 2: this launcher does not run sequence", False),
        ({"sequence_parallel_size": 2}, "sequence_parallel_size 2: this launcher does not run sequence", True),
    ],
)
def test_sequence_parallelism_and_tp_outside_pretrain_are_refused_before_anything_is_built(
    tmp_path, extra, key, tensor_parallel
):
    path = tmp_path / "tp.json"
    path.write_text(json.dumps({**json.loads((CONFIG_DIR / "zero1.json").read_text()), **extra}))
    with pytest.raises(ConfigError, match=rf"--ds_config {path}: {key}"):
        load_ds_config(path, tensor_parallel=tensor_parallel)
    path.write_text(
        json.dumps({**json.loads((CONFIG_DIR / "zero1.json").read_text()), "tensor_parallel": {"autotp_size": 1}})
    )
    assert load_ds_config(path)["tensor_parallel"] == {"autotp_size": 1}  # size 1 is no parallelism
