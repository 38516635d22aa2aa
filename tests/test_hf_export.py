"""``<save_dir>/hf/`` (vscale_plugin.train.export): the launcher's Hugging Face export of the model, its tokenizer and
generation config, replaced as a whole; read by vsp.from_pretrained, plain transformers, analyze and evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vscale_plugin as vsp
from vscale_plugin.data import build_tokenizer
from vscale_plugin.data.sources import smoke_documents
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.testing.distributed import run_deepspeed, without_launcher_vars
from vscale_plugin.train.cli import parse_args
from vscale_plugin.train.export import save_hf, write_atomically

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launchers" / "pretrain.py"
ANALYZE = REPO / "launchers" / "analyze.py"
# Text the smoke corpus lacks: runs of spaces, newlines, tabs, characters only byte fallback encodes, and text that
# spells special and byte pieces (SentencePiece never matches those in text).
ODD_TEXTS = ["  hello   world  \n\n tabs\tand ünïcödé 中文 😀 ", "", " ", "\n", "a  b", "</s> inside <unk> <0x41> A"]


# --- the atomic replace ---------------------------------------------------------------------------------------------


def _write_files(files: dict[str, str]):
    def write(directory: Path) -> None:
        for name, text in files.items():
            (directory / name).write_text(text)

    return write


def test_a_failed_export_leaves_the_previous_hf_directory_as_it_was(tmp_path):
    target = tmp_path / "hf"
    write_atomically(target, _write_files({"config.json": "old", "model.safetensors": "old"}))

    def crash(directory: Path) -> None:
        (directory / "config.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, crash)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "old", "model.safetensors": "old"}
    write_atomically(target, _write_files({"config.json": "new"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "no partial or previous directory left"


def test_a_crash_between_the_renames_is_repaired_by_the_next_export(tmp_path):
    target = tmp_path / "hf"
    write_atomically(target, _write_files({"config.json": "old"}))
    target.rename(tmp_path / "hf.previous")  # where a crash after the first rename leaves it

    def crash(directory: Path) -> None:
        raise OSError("killed")

    with pytest.raises(OSError):
        write_atomically(target, crash)
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.partial"]


# --- the tokenizer ---------------------------------------------------------------------------------------------------


def test_the_smoke_sentencepiece_tokenizer_exports_as_an_autotokenizer_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    ours = build_tokenizer(None, "smoke", tmp_path / "cache")
    assert ours.save_pretrained(tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [*smoke_documents(), *ODD_TEXTS]
    assert theirs(texts, add_special_tokens=False)["input_ids"] == ours.encode_batch(texts)
    assert theirs.encode("x y") == ours.encode("x y"), "no BOS, no EOS added by default"
    assert (theirs.eos_token_id, theirs.bos_token_id, len(theirs)) == (ours.eos_id, None, ours.vocab_size)
    ids = ours.encode(ODD_TEXTS[0])
    assert theirs.decode(ids) == ours.decode(ids)


def test_a_hugging_face_tokenizer_exports_itself(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = sorted({w for text in smoke_documents()[:5] for w in text.split()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "src"
    )
    ours = build_tokenizer(str(tmp_path / "src"), "smoke", tmp_path / "cache")
    assert ours.save_pretrained(tmp_path / "hf")
    text = smoke_documents()[0][:2000]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text, add_special_tokens=False)["input_ids"] == ours.encode(
        text
    )


def test_bigram_backcopy_has_no_tokenizer_to_export(tmp_path):
    assert not build_tokenizer(None, "bigram_backcopy", tmp_path).save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- save_hf: what one export holds -------------------------------------------------------------------------------


def _tiny_model(vocab: int, eos: int):
    from vscale_plugin.train.model import new_model
    from vscale_plugin.train.recipe import PRESETS, llama_config

    model = vsp.apply_vscale(new_model(llama_config(PRESETS["sinklab"], vocab, eos), seed=0))
    model.config.use_cache = False  # as build_model leaves it
    return model


def test_a_bigram_backcopy_model_exports_without_tokenizer_and_says_so(tmp_path):
    tokenizer = build_tokenizer(None, "bigram_backcopy", tmp_path)
    model = _tiny_model(tokenizer.vocab_size, tokenizer.eos_id)
    save_hf(model, model.state_dict(), tmp_path, tokenizer, "bigram_backcopy")
    assert not any(p.name.startswith("tokenizer") for p in tmp_path.iterdir())
    assert "no tokenizer" in (tmp_path / "README.md").read_text().lower()
    assert not model.config.use_cache, "the training model's config is left as it was"
    loaded = vsp.from_pretrained(tmp_path)
    assert loaded.config.use_cache and vsp.is_vscaled(loaded)
    ids = torch.tensor([[tokenizer.eos_id, 5, 7, 9]])
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_a_bf16_model_exports_its_bf16_weights(tmp_path):
    from safetensors import safe_open

    tokenizer = build_tokenizer(None, "bigram_backcopy", tmp_path)
    model = _tiny_model(tokenizer.vocab_size, tokenizer.eos_id).to(torch.bfloat16)  # as DeepSpeed's bf16 engine
    save_hf(model, model.state_dict(), tmp_path, tokenizer, "bigram_backcopy")
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert vsp.from_pretrained(tmp_path).dtype == torch.bfloat16


# --- the flag ---------------------------------------------------------------------------------------------------------


def test_export_every_negative_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--export_every -2: must be >= 0"):
        parse_args(["--ds_config", "zero2", "--export_every", "-2"])


def test_export_every_with_no_checkpoint_is_a_usage_error_naming_both():
    with pytest.raises(UsageError, match=r"--no_checkpoint writes no checkpoint and no hf/ export.*--export_every"):
        parse_args(["--ds_config", "zero2", "--no_checkpoint", "--export_every", "2"])
    assert parse_args(["--ds_config", "zero2", "--no_checkpoint"]).export_every == 0


# --- the launcher end to end -----------------------------------------------------------------------------------------


def _env(root: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "VSP_CACHE": str(root / "cache")}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """4 smoke steps on 2 ranks under ZeRO-2 and ZeRO-3, hf/ exported at step 2 and at the end."""
    root = tmp_path_factory.mktemp("hf-export")
    runs = {}
    for stage in (2, 3):
        runs[stage] = run_deepspeed(PRETRAIN, "--ds_config", f"zero{stage}", "--preset", "smoke", "--max_steps", "4",
                                    "--export_every", "2", "--stats_every", "0", "--seed", "1", "--save_dir",
                                    root / f"zero{stage}", "--experiment", "hf-export", num_gpus=2,
                                    env=_env(root))  # fmt: skip
    return {"root": root, "runs": runs}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_directory_has_the_checkpoint_weights_tokenizer_and_generation_config(trained, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from vscale_plugin.evaluate.models import load_training_checkpoint

    save_dir = trained["root"] / f"zero{stage}"
    proc = trained["runs"][stage]
    assert "step 2: Hugging Face model in" in proc.stdout + proc.stderr, "the export of --export_every 2"
    assert f"Hugging Face model of step 4 in {save_dir / 'hf'}" in proc.stdout
    hf = save_dir / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in hf.iterdir()
    }
    assert not (save_dir / "hf.partial").exists() and not (save_dir / "hf.previous").exists()

    record = json.loads((save_dir / "vscale_run.json").read_text())
    ours = build_tokenizer(record["tokenizer"], record["dataset"], trained["root"] / "cache")
    texts = smoke_documents()[:20]
    assert AutoTokenizer.from_pretrained(hf)(texts, add_special_tokens=False)["input_ids"] == ours.encode_batch(texts)
    generation = GenerationConfig.from_pretrained(hf)
    assert generation.eos_token_id == ours.eos_id == generation.pad_token_id

    exported = vsp.from_pretrained(hf)
    assert exported.config.vscale == {"mode": "learned", "sigma": 0.02}
    assert exported.dtype == torch.float32, "an fp32 run exports its fp32 weights"
    assert exported.config.use_cache, "the KV cache training turned off is on again for generation"
    checkpoint = load_training_checkpoint(save_dir, torch.float32)
    ids = torch.tensor([ours.encode(texts[0])[:64]])
    expected = _logits(checkpoint, ids)
    if stage == 2:
        assert torch.equal(_logits(exported, ids), expected)
    else:
        torch.testing.assert_close(_logits(exported, ids), expected, rtol=1e-5, atol=1e-5)
    # theta is trained (not its zero init) and exported
    thetas = [t for n, t in exported.named_parameters() if "vscale" in n]
    assert thetas and any(t.abs().max() > 0 for t in thetas)
    plain = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    assert torch.equal(_logits(plain, ids), _logits(exported, ids))
    out = exported.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.e2e
@pytest.mark.distributed
def test_evaluate_and_analyze_take_the_hf_directory_as_hf_and_the_save_dir_as_a_checkpoint(trained):
    from vscale_plugin.evaluate.models import model_source

    save_dir = trained["root"] / "zero2"
    assert model_source(str(save_dir)).is_training_checkpoint, "a save_dir holding hf/ is still a checkpoint"
    source = model_source(str(save_dir / "hf"))
    assert not source.is_training_checkpoint and source.tokenizer == str(save_dir / "hf")
    env = {**without_launcher_vars(os.environ), **_env(trained["root"])}
    proc = subprocess.run([sys.executable, str(ANALYZE), "--model", str(save_dir / "hf"), "--batches", "1",
                           "--batch_size", "2", "--seq_len", "64", "--out", str(trained["root"] / "analysis")],
                          cwd=trained["root"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((trained["root"] / "analysis" / "metrics.json").read_text())
    assert "gs/ratio/median" in metrics and "vscale/phi/tok0/L00" in metrics
