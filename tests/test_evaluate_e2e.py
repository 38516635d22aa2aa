"""launchers/evaluate.py end to end (issue 13) on checkpoints of the real launcher: a ZeRO-2 and a ZeRO-3 checkpoint
of the same training and an HF directory of the same weights evaluate alike; a baseline/V-scale pair (one named by its
MLflow run) gives results.json, report.md with the tables, figures and one MLflow run per model tagged with its
training run; two ranks give the records of one; bad inputs are one error line and exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from vscale_plugin.testing.distributed import run_deepspeed, without_launcher_vars

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launchers" / "pretrain.py"
EVALUATE = REPO / "launchers" / "evaluate.py"
NATIVE = 128  # the smoke preset's context
# A small grid that still has every kind of cell: perplexity, one NIAH task over seeds, a static scheme (calibrated),
# a dynamic one, and a context extended with YaRN.
GRID = ("--tasks", "ppl,niah_single_2", "--quant", "none,w8a8_static", "--seeds", "2", "--samples", "2",
        "--calib", "4", "--ppl_windows", "8", "--context", f"{NATIVE},{2 * NATIVE}", "--yarn", "2")  # fmt: skip

pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.slow]


def _env(root: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
            "VSP_CACHE": str(root / "cache")}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three short smoke trainings on 2 ranks: the baseline and V-scale under ZeRO-2, and V-scale under ZeRO-3."""
    root = tmp_path_factory.mktemp("evaluate")
    for name, mode, stage in (("off", "off", 2), ("learned", "learned", 2), ("learned-z3", "learned", 3)):
        run_deepspeed(PRETRAIN, "--ds_config", f"zero{stage}", "--preset", "smoke", "--max_steps", "3", "--vscale",
                      mode, "--stats_every", "0", "--save_dir", root / name, "--experiment", "trained", "--run_name",
                      name, num_gpus=2, env=_env(root))  # fmt: skip
    return root


def _evaluate(root: Path, *flags, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**without_launcher_vars(os.environ), **_env(root)}
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, flags)], cwd=cwd or root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _results(out: Path) -> dict[tuple, float]:
    records = json.loads((out / "results.json").read_text())
    return {(r["quant"], r["task"], r["context"], r["seed"], r["metric"]): r["value"] for r in records}


def _hf_directory_of_zero2(root: Path) -> Path:
    """The ZeRO-2 checkpoint's weights, read from DeepSpeed's module file (ZeRO-2 keeps the whole fp32 module
    there), saved by save_pretrained: the same weights by another road than the consolidation evaluate.py uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import vscale_plugin as vsp

    save_dir = root / "learned"
    tag = (save_dir / "latest").read_text().strip()
    states = torch.load(save_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    model = vsp.apply_vscale(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(save_dir)))
    model.load_state_dict(states["module"], strict=True)
    out = root / "hf-learned"
    model.save_pretrained(out)
    return out


def test_zero2_zero3_and_hf_directory_of_the_same_weights_evaluate_alike(trained):
    hf_dir = _hf_directory_of_zero2(trained)
    results = {}
    for name, model in (("z2", trained / "learned"), ("z3", trained / "learned-z3"), ("hf", hf_dir)):
        # The HF directory brings no tokenizer of its own: it is the smoke run's SentencePiece model.
        tokenizer = ("--tokenizer", next((trained / "cache").glob("smoke-*.model"))) if name == "hf" else ()
        proc = _evaluate(trained, "--model", model, *GRID, "--dataset", "smoke", *tokenizer, "--out",
                         trained / f"same-{name}", "--experiment", "same")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = _results(trained / f"same-{name}")
    assert results["z2"].keys() == results["hf"].keys() == results["z3"].keys()
    assert len(results["z2"]) == 2 * 2 * (2 + 2), "2 schemes x 2 contexts x (ppl + bpb + 2 NIAH seeds)"
    assert results["hf"] == results["z2"], "the same weights by two roads"
    for key, value in results["z2"].items():
        # ZeRO-3 trains the same model up to the order of its reductions
        assert results["z3"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _run_id(root: Path, name: str) -> str:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("trained").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")
    return run.info.run_id


def test_pair_gives_results_report_figures_and_mlflow_runs_tagged_with_their_training_runs(trained):
    learned_id = _run_id(trained, "learned")
    out = trained / "pair"
    harness_flags = ("--lm_eval_tasks", "vsp_local_mc", "--lm_eval_limit", "8")
    proc = _evaluate(trained, "--model", trained / "off", "--model", f"runs:/{learned_id}", *GRID, *harness_flags,
                     "--out", out, "--experiment", "downstream")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    assert {tuple(sorted(r)) for r in records} == {
        ("context", "metric", "model", "quant", "seed", "task", "value", "vscale")
    }
    assert {(r["model"], r["vscale"]) for r in records} == {("off", "off"), ("learned", "learned")}
    ppl = [r for r in records if r["metric"] == "ppl"]
    assert all(1 < r["value"] < 1e4 for r in ppl) and {r["context"] for r in ppl} == {NATIVE, 2 * NATIVE}
    niah = [r for r in records if r["task"] == "niah_single_2"]
    assert {r["seed"] for r in niah} == {0, 1} and all(0 <= r["value"] <= 1 for r in niah)
    harness = [r for r in records if r["task"] == "vsp_local_mc"]
    assert {(r["model"], r["quant"], r["metric"]) for r in harness} == {
        (m, q, "acc") for m in ("off", "learned") for q in ("none", "w8a8_static")
    }, "lm-eval on every model under every scheme, at the native context"
    assert all(r["context"] == NATIVE and r["value"] in {i / 8 for i in range(9)} for r in harness)
    report = (out / "report.md").read_text()
    header = f"| quant | {NATIVE}: off | {NATIVE}: learned | Δ |"
    for title in ("### ppl", "### bpb", "### niah_single_2", "### vsp_local_mc", header, "`w8a8_static`:", "v_proj"):
        assert title in report, title
    assert (out / "niah.png").stat().st_size > 0 and (out / "ppl.png").stat().st_size > 0

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("downstream").experiment_id])
    by_mode = {run.data.tags["vscale"]: run for run in runs}
    assert set(by_mode) == {"off", "learned"}
    assert by_mode["learned"].data.tags["source_run"] == learned_id
    assert by_mode["off"].data.tags["source_run"] == _run_id(trained, "off"), "a --save_dir knows its run too"
    metrics = by_mode["learned"].data.metrics
    mine = {(r["quant"], r["context"]): r["value"] for r in ppl if r["model"] == "learned"}
    for (scheme, context), value in mine.items():
        assert metrics[f"eval/ppl/{scheme}/{context}"] == pytest.approx(value)
    seeds = [r["value"] for r in niah if r["model"] == "learned" and r["quant"] == "none" and r["context"] == NATIVE]
    assert metrics[f"eval/niah_single_2/none/{NATIVE}"] == pytest.approx(sum(seeds) / len(seeds))
    assert f"eval/niah_single_2/none/{NATIVE}/std" in metrics
    artifacts = {a.path for a in client.list_artifacts(by_mode["learned"].info.run_id, "evaluation")}
    assert {"evaluation/results.json", "evaluation/report.md", "evaluation/niah.png"} <= artifacts


def test_two_ranks_give_the_records_of_one(trained):
    flags = ["--model", str(trained / "off"), *GRID, "--experiment", "ranks"]
    one = _evaluate(trained, *flags, "--out", trained / "one-rank")
    assert one.returncode == 0, one.stderr[-3000:]
    run_deepspeed(EVALUATE, *flags, "--out", trained / "two-ranks", num_gpus=2, env=_env(trained))
    two = _results(trained / "two-ranks")
    assert two.keys() == _results(trained / "one-rank").keys()
    for key, value in _results(trained / "one-rank").items():
        assert two[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "{root}/cache"], r"--model .*/cache: not a Hugging Face model"),
        (["--model", "{root}/off", "--context", "512"],
         r"--context 512: more than the 128 positions of --model .*; pass --yarn 4 to extend it with YaRN"),
        (["--model", "{root}/off", "--tasks", "ppl,niah_single_7"], r"--tasks niah_single_7: unknown task"),
        (["--model", "{root}/off", "--quant", "w2a2"], r"--quant w2a2: .*w8a8_smoothquant"),
        (["--model", "runs:/0123456789abcdef"], r"--model runs:/0123456789abcdef: no such run in the MLflow store"),
        (["--model", "{root}/off", "--quant", "w8a8_static", "--dataset", "{root}/tiny.jsonl", "--calib", "64"],
         r"--calib 64: --dataset .*tiny.jsonl holds only \d+ training sequences of 128 tokens"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2(trained, flags, message):
    (trained / "tiny.jsonl").write_text("".join(json.dumps({"text": f"short document {i}."}) + "\n" for i in range(40)))
    proc = _evaluate(trained, "--tasks", "ppl", *[f.format(root=trained) for f in flags], "--out", trained / "bad")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
