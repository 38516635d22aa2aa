"""launchers/compare.py: report.md and figures from MLflow runs, the comparison run, and its one-line errors.

Most tests read runs logged straight into a real MLflow SQLite store (a tiny 4-layer model trained a few steps with
the real StatsCollector, so every SPEC section 4 key and the profiles artifacts are there); one compares two real
smoke runs of launchers/pretrain.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

import vscale_plugin as vsp
from vscale_plugin.testing.distributed import free_port, run_deepspeed
from vscale_plugin.testing.models import tiny_model

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "launchers" / "compare.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {
    "sink_rate",
    "quant_readiness",
    "activation_norms",
    "gradient_sink_ratio",
    "value_norms",
    "loss",
    "lambda",
    "evolution",
    "gradient_profiles",
}
STAT_COLUMNS = ("median R_GS", "mean sink rate", "max tok0 |h_out|", "max tok0 |mlp_out|")

pytestmark = pytest.mark.e2e


# ---- runs logged straight into MLflow ----


@dataclass
class Store:
    root: Path
    uri: str
    runs: dict[str, str]  # role -> run id

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def _plant_sinks(model: torch.nn.Module) -> None:
    """Attention sinks on a BOS-like token 0, as in trained models (the construction of test_stats_reference.py).

    Every token carries a constant channel (hidden dim 0) and token id 0 alone a large one (dim 1); the keys' slowest
    RoPE pair reads dim 1 and, for some query heads per layer, the queries' same pair reads dim 0, so those heads
    attend to position 0 whatever the query. v_proj ignores dim 1: the sink's value stays small.
    """
    cfg = model.config
    hd, slow = cfg.head_dim, cfg.head_dim // 2 - 1
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0], emb[:, 1] = 0.1, 0.0
        emb[0, 1] = 1.0
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for h in range(cfg.num_key_value_heads):
                attn.k_proj.weight[h * hd + slow, :] = 0.0
                attn.k_proj.weight[h * hd + slow, 1] = 1.0
            for h in range(i % cfg.num_attention_heads + 1):  # 1, 2, 3, 4 sink heads in layers 0..3
                attn.q_proj.weight[h * hd + slow, :] = 0.0
                attn.q_proj.weight[h * hd + slow, 0] = 1.0
            attn.v_proj.weight[:, 1] = 0.0


def _log_run(
    client: MlflowClient,
    experiment_id: str,
    mode: str,
    start: int,
    seed: int,
    *,
    stats: bool = True,
    finish: bool = True,
    tags: dict[str, str] | None = None,
    preset: str = "smoke",
    steps: int = 6,
) -> str:
    """A training run as launchers/pretrain.py logs it: params, tags, training metrics, statistics every 3 steps."""
    model = tiny_model("llama", num_hidden_layers=4, seed=seed).train()
    _plant_sinks(model)
    if mode != "off":
        vsp.apply_vscale(model, mode=mode)
        if mode == "learned":  # a learned run's lambda drifts away from 1; the heatmap must show it
            with torch.no_grad():
                thetas = [p for n, p in model.named_parameters() if "vscale" in n]
                for layer, p in enumerate(thetas):
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()) * (layer + 1) / 4)
    run = client.create_run(experiment_id, run_name=f"{preset}-{mode}-{seed}", start_time=start,
                            tags={"vscale": mode, "preset": preset, **(tags or {})})  # fmt: skip
    run_id = run.info.run_id
    config = model.config
    params = {"vscale": mode, "seed": seed, "world_size": 1, "model.num_hidden_layers": config.num_hidden_layers,
              "model.hidden_size": config.hidden_size, "model.num_key_value_heads": config.num_key_value_heads,
              "recipe.max_steps": steps, "recipe.lr": 3e-3, "recipe.seq_len": 64}  # fmt: skip
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(3, 128, (steps, 2, 64), generator=g)
    held_out = torch.randint(3, 128, (2, 64), generator=g)
    train[:, :, 0] = held_out[:, 0] = 0  # every sequence starts with the sink token
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collector = vsp.StatsCollector(model, every=3, distributed=False)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        with collector.capture(step) if stats else torch.enable_grad():
            loss = model(input_ids=train[step - 1], labels=train[step - 1]).loss
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad()
        step_s = time.perf_counter() - t0
        metrics = {"train/loss": loss.item(), "train/lr": 3e-3, "train/grad_norm": grad_norm, "perf/step_s": step_s,
                   "perf/tokens_per_s": 128 / step_s}  # fmt: skip
        if step % 3 == 0:
            with torch.no_grad():
                metrics["eval/loss"] = model(input_ids=held_out, labels=held_out).loss.item()
        if stats and collector.result():
            metrics.update(collector.result())
            with tempfile.TemporaryDirectory() as tmp:  # the launcher's name: stats/profiles_stepXXXXXXXX.json
                path = Path(tmp) / f"profiles_step{step:08d}.json"
                path.write_text(json.dumps({"step": step, **collector.profiles()}))
                client.log_artifact(run_id, str(path), "stats")
        ts = start + step * 1000
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])
    if finish:
        client.set_terminated(run_id, "FINISHED", end_time=start + 10_000)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("compare-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("synthetic", artifact_location=str(root / "artifacts"))
    t = 1_700_000_000_000
    runs = {
        "old_learned": _log_run(client, experiment, "learned", t, seed=1),
        "off": _log_run(client, experiment, "off", t + 100_000, seed=2),
        "learned": _log_run(client, experiment, "learned", t + 200_000, seed=3),
        # Newer, but not what the default selection may pick: unfinished, post-hoc analysis, another preset's.
        "running": _log_run(client, experiment, "off", t + 300_000, seed=4, finish=False),
        "analysis": _log_run(client, experiment, "learned", t + 400_000, seed=5, tags={"analysis": "true"}),
        "other_preset": _log_run(client, experiment, "learned", t + 500_000, seed=6, preset="0.1B"),
    }
    bare = client.create_experiment("no-stats", artifact_location=str(root / "artifacts-no-stats"))
    runs["no_stats_off"] = _log_run(client, bare, "off", t, seed=7, stats=False)
    runs["no_stats_learned"] = _log_run(client, bare, "learned", t + 100_000, seed=8, stats=False)
    return Store(root, uri, runs)


def _compare(uri: str, *flags: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, str(COMPARE), *map(str, flags)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


# ---- reading report.md back ----


def _split(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table(report: str) -> list[dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = _split(lines[0])
    assert set(_split(lines[1])) == {"---"}
    assert not any(line.startswith("|") for line in report.split("\n\n", 2)[2].splitlines()), "more than one table"
    return [dict(zip(header, _split(line), strict=True)) for line in lines[2:]]


def _expected(client: MlflowClient, run_id: str) -> dict[str, float | None]:
    """The report's columns, recomputed from what MLflow holds for the run."""
    metrics = client.get_run(run_id).data.metrics
    throughput = [m.value for m in client.get_metric_history(run_id, "perf/tokens_per_s")]
    return {
        "train loss": metrics.get("train/loss"),
        "eval loss": metrics.get("eval/loss"),
        "perplexity": math.exp(metrics["eval/loss"]) if "eval/loss" in metrics else None,
        "median R_GS": metrics.get("gs/ratio/median"),
        "mean sink rate": metrics.get("as/sink_rate/mean"),
        "max tok0 |h_out|": metrics.get("ma/h_out/tok0/max"),
        "max tok0 |mlp_out|": metrics.get("ma/mlp_out/tok0/max"),
        "tokens/s": statistics.median(throughput) if throughput else None,
        **_expected_per_layer(metrics),
    }


def _expected_per_layer(metrics: dict[str, float]) -> dict[str, float | None]:
    """The per-layer columns from the raw per-layer keys: largest sink rate, largest token-0/rest |h_out| ratio,
    token-0/rest |v| where the sink rate is largest."""
    n = sum(1 for key in metrics if key.startswith("as/sink_rate/L"))
    if n == 0:
        return {"max sink rate": None, "max tok0/rest |h_out|": None, "tok0/rest |v|": None}
    rates = [metrics[f"as/sink_rate/L{i:02d}"] for i in range(n)]
    peaks = [metrics[f"ma/h_out/tok0/L{i:02d}"] / metrics[f"ma/h_out/rest/L{i:02d}"] for i in range(n)]
    top = rates.index(max(rates))
    return {
        "max sink rate": max(rates),
        "max tok0/rest |h_out|": max(peaks),
        "tok0/rest |v|": metrics[f"ma/v/tok0/L{top:02d}"] / metrics[f"ma/v/rest/L{top:02d}"],
    }


def _assert_numbers_match_mlflow(client: MlflowClient, rows: list[dict[str, str]]) -> int:
    """Every number of every row equals MLflow's value at the report's 4 significant digits; returns the count."""
    runs = [row for row in rows if "/" not in row["vscale"]]
    baseline = next((row for row in runs if row["vscale"] == "off"), None)
    checked = 0
    for row in rows:
        expected = _expected(client, row["id"])
        assert set(row) == {"run", "id", "vscale", *expected}
        if "/" in row["vscale"]:
            assert baseline is not None and row["vscale"] == f"{client.get_run(row['id']).data.tags['vscale']} / off"
            base = _expected(client, baseline["id"])
            expected = {k: v / base[k] if v is not None and base[k] else None for k, v in expected.items()}
        else:
            run = client.get_run(row["id"])
            assert row["vscale"] == run.data.tags["vscale"] and row["run"] == run.info.run_name
        for column, value in expected.items():
            if value is None:
                assert row[column] == "-", (row["run"], column, row[column])
            else:
                assert float(row[column]) == float(f"{value:.4g}"), (row["run"], column, row[column], value)
                checked += 1
    return checked


def _assert_figures(out: Path, names: set[str]) -> None:
    files = sorted((out / "figures").iterdir())
    assert {f.stem for f in files} == names and all(f.suffix == ".png" for f in files)
    report = (out / "report.md").read_text()
    for f in files:
        data = f.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1024, f
        assert f"](figures/{f.name})" in report


def _comparison_runs(client: MlflowClient, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string="tags.comparison = 'true'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---- the report from logged runs ----


@pytest.fixture(scope="module")
def compared(store: Store) -> subprocess.CompletedProcess:
    return _compare(store.uri, "--experiment", "synthetic", "--filter", "tags.preset = 'smoke'", "--out",
                    store.root / "out", "--run_name", "first-comparison")  # fmt: skip


def test_default_selection_is_the_newest_finished_training_run_of_each_mode(store: Store, compared) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = _table((store.root / "out" / "report.md").read_text())
    assert [(row["id"], row["vscale"]) for row in rows] == [
        (store.runs["off"], "off"),
        (store.runs["learned"], "learned"),
        (store.runs["learned"], "learned / off"),
    ]


def test_every_number_in_report_equals_the_value_read_back_from_mlflow(store: Store, compared) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = _table((store.root / "out" / "report.md").read_text())
    assert _assert_numbers_match_mlflow(store.client, rows) == 3 * 11
    assert compared.stdout.startswith("| run | id | vscale |")  # the same table on the terminal


def test_the_report_states_the_papers_directions_with_the_ratios_of_its_table(store: Store, compared) -> None:
    text = (store.root / "out" / "report.md").read_text()
    rows = _table(text)
    ratio = next(row for row in rows if row["vscale"] == "learned / off")
    for what, column, bound, side in (
        ("sinks kept", "max sink rate", 0.9, "at least"),
        ("token-0 massive activations suppressed", "max tok0 |h_out|", 0.5, "at most"),
    ):
        value = float(ratio[column])
        holds = value >= bound if side == "at least" else value <= bound
        line = next(line for line in text.splitlines() if line.startswith(f"- learned: {what} "))
        assert f"{side} {bound}x the baseline's): {ratio[column]}x" in line, line
        assert line.endswith(", holds") if holds else line.endswith(", does not hold"), line


def test_figures_are_non_empty_pngs_referenced_by_the_report(store: Store, compared) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    _assert_figures(store.root / "out", ALL_FIGURES)


def test_comparison_run_holds_the_report_and_figures_and_names_its_sources(store: Store, compared) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    client = store.client
    (run,) = [r for r in _comparison_runs(client, "synthetic") if r.info.run_name == "first-comparison"]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["comparison"] == "true" and "vscale" not in tags
    assert tags["sources"] == f"{store.runs['off']},{store.runs['learned']}"
    assert tags["source.off"] == store.runs["off"] and tags["source.learned"] == store.runs["learned"]
    assert tags["baseline"] == store.runs["off"]
    assert "| learned |" in tags["mlflow.note.content"]  # the table is the run's description in the UI
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.md", "figures"}
    logged = {Path(a.path).stem for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == ALL_FIGURES
    local = client.download_artifacts(run.info.run_id, "report.md", str(store.root / "downloaded"))
    assert Path(local).read_text() == (store.root / "out" / "report.md").read_text()
    assert f"comparison run 'first-comparison' ({run.info.run_id})" in compared.stdout


def test_a_later_comparison_never_selects_comparison_runs(store: Store, compared) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    proc = _compare(store.uri, "--experiment", "synthetic", "--filter", "tags.preset = 'smoke'", "--out",
                    store.root / "again")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = {row["id"] for row in _table((store.root / "again" / "report.md").read_text())}
    assert ids == {store.runs["off"], store.runs["learned"]}
    assert len(_comparison_runs(store.client, "synthetic")) == 2


def test_explicit_runs_without_statistics_show_dashes_and_warn(store: Store, tmp_path: Path) -> None:
    proc = _compare(store.uri, "--experiment", "synthetic", "--runs", store.runs["no_stats_learned"],
                    store.runs["off"], "--out", tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--stats_every" in proc.stderr and store.runs["no_stats_learned"] in proc.stderr
    rows = _table((tmp_path / "report.md").read_text())
    assert [row["id"] for row in rows] == [
        store.runs["no_stats_learned"],
        store.runs["off"],
        store.runs["no_stats_learned"],
    ]
    assert all(rows[0][c] == "-" and rows[2][c] == "-" for c in STAT_COLUMNS)
    _assert_numbers_match_mlflow(store.client, rows)
    # No lambda metric without statistics: the heatmap is left out, every other figure shows the baseline.
    _assert_figures(tmp_path, ALL_FIGURES - {"lambda"})


# ---- one-line errors ----


def test_unknown_experiment_exits_2_and_lists_existing_ones(store: Store, tmp_path: Path) -> None:
    line = _error_line(_compare(store.uri, "--experiment", "nope", "--out", tmp_path))
    assert "--experiment nope" in line and "synthetic" in line and "no-stats" in line


def test_no_matching_runs_exits_2_and_names_the_filter(store: Store, tmp_path: Path) -> None:
    line = _error_line(_compare(store.uri, "--experiment", "synthetic", "--filter", "tags.preset = '1B'",
                                "--out", tmp_path))  # fmt: skip
    assert "tags.preset = '1B'" in line and "change the filter" in line


def test_invalid_filter_exits_2_with_an_example(store: Store, tmp_path: Path) -> None:
    line = _error_line(
        _compare(store.uri, "--experiment", "synthetic", "--filter", "preset = smoke", "--out", tmp_path)
    )
    assert "not an MLflow search filter" in line and "tags.preset = 'smoke'" in line


def test_runs_without_statistics_exit_2_and_name_the_flag(store: Store, tmp_path: Path) -> None:
    line = _error_line(_compare(store.uri, "--experiment", "no-stats", "--out", tmp_path))
    assert "--stats_every N" in line and store.runs["no_stats_off"] in line


def test_unknown_run_id_exits_2(store: Store, tmp_path: Path) -> None:
    line = _error_line(_compare(store.uri, "--experiment", "synthetic", "--runs", "0123abcd", "--out", tmp_path))
    assert "--runs 0123abcd: no such run" in line


def test_runs_and_filter_together_exit_2(store: Store, tmp_path: Path) -> None:
    line = _error_line(_compare(store.uri, "--experiment", "synthetic", "--runs", store.runs["off"], "--filter",
                                "tags.preset = 'smoke'", "--out", tmp_path))  # fmt: skip
    assert "give one of the two" in line


def test_unreachable_tracking_server_exits_2_and_names_uri_and_fix(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    line = _error_line(_compare(uri, "--experiment", "synthetic", "--out", tmp_path))
    assert f"cannot reach the MLflow tracking store {uri}" in line
    assert "MLFLOW_TRACKING_URI" in line and "mlflow server" in line


def test_missing_local_store_exits_2_without_creating_one(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "mlflow.db"
    line = _error_line(_compare(f"sqlite:///{db}", "--experiment", "synthetic", "--out", tmp_path / "out"))
    assert f"no MLflow store at {db}" in line and "MLFLOW_TRACKING_URI" in line
    assert not db.exists()


def test_unwritable_out_exits_2(store: Store, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _error_line(_compare(store.uri, "--experiment", "synthetic", "--out", blocker / "report"))
    assert f"--out {blocker / 'report'}: not writable" in line and "choose a directory" in line


# ---- two real smoke runs of launchers/pretrain.py ----


@pytest.mark.distributed
def test_two_real_smoke_runs_compare_end_to_end(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "VSP_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    for mode in ("off", "learned"):
        run_deepspeed(REPO / "launchers" / "pretrain.py", "--ds_config", REPO / "ds_configs" / "zero2.json",
                      "--max_steps", "6", "--stats_every", "3", "--vscale", mode, "--save_dir", tmp_path / mode,
                      "--experiment", "cmp", env=env, timeout=600)  # fmt: skip
    shutil.rmtree(tmp_path / "off")  # the comparison reads MLflow only, not the checkpoints
    proc = _compare(env["MLFLOW_TRACKING_URI"], "--experiment", "cmp", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    rows = _table((tmp_path / "out" / "report.md").read_text())
    assert [row["vscale"] for row in rows] == ["off", "learned", "learned / off"]
    # The sink rate of a 6-step model is 0 in both runs, so its ratio is '-'; every other number is there.
    assert _assert_numbers_match_mlflow(client, rows) >= 3 * 8 - 1
    _assert_figures(tmp_path / "out", ALL_FIGURES)
    (run,) = _comparison_runs(client, "cmp")
    assert run.data.tags["sources"] == ",".join(row["id"] for row in rows[:2])
    assert {Path(a.path).stem for a in client.list_artifacts(run.info.run_id, "figures")} == ALL_FIGURES
