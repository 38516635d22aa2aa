"""All benchmarks in one run on one device, within a time budget: JSON results and a table printed last.

    bash benchmarks/gpu_suite.sh                                   # the GPU suite (installs carried wheels first)
    python benchmarks/suite.py --device cuda --out results/gpu     # the same, dependencies already installed
    python benchmarks/suite.py --device cpu --quick                # a trial of the whole flow on CPU, tiny shapes

For each preset (0.1B, 0.3B, 1B by default), in this order so that the most important numbers come first:
``vscale_overhead.py`` (V-scale vs baseline step time, eager and, with ``--kernels``, the fused kernel),
``launcher_vs_loop.py`` (``--launcher_steps`` steps of the real launcher with ZeRO-2: tokens/s, MFU, against a plain
PyTorch loop), ``collector_overhead.py`` (idle/capture/amortised, capture-step memory at T = 1k/2k/4k) and
``data_throughput.py`` (the launcher's pipeline against the launcher's measured tokens/s); then, for the first
preset, ``engine_phases.py`` (forward/backward/step of a plain model vs the DeepSpeed engine); then, per preset,
``evaluate_throughput.py`` (evaluation perplexity tokens/s and NIAH samples/s, as is and fake-quantised); last,
``sp_statistics.py`` and ``tp_statistics.py`` (a statistics capture step against a normal one per rank, time and
extra peak memory against T, under Ulysses SP 2 and AutoTP 2), which need 2 GPUs: on a host with fewer they are
reported as skipped with the count ("needs 2 GPUs, this host has 1"), which does not make the suite fail. Each runs
as its own process with a timeout that keeps the whole suite inside ``--budget_s``; what the budget cannot fit is
reported as skipped, never silently dropped. Every result is a JSON file in ``--out``, with ``suite.json`` indexing
them; the exit code is 0 only when every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
C4_SAMPLE = REPO / "tests" / "data" / "c4-sample.jsonl"
KERNELS = ("eager", "compiled")
# What each benchmark imports beyond torch and transformers. A step whose needs do not import here is reported as
# skipped with the import error, so that an offline host without, say, pyarrow still gets the V-scale and collector
# figures instead of a string of failures.
NEEDS = {
    "vscale_overhead": (),
    "collector_overhead": (),
    "launcher_vs_loop": ("deepspeed", "mlflow", "datasets"),
    "data_throughput": ("datasets",),
    "engine_phases": ("deepspeed", "datasets"),
    "evaluate_throughput": ("datasets",),  # vscale_plugin.data (the perplexity's tokenizer type) imports it
    "sp_statistics": ("deepspeed",),
    "tp_statistics": ("deepspeed",),
}
# GPUs a benchmark needs (it starts that many ranks); on a host with fewer it is skipped, not failed.
GPUS = {"sp_statistics": 2, "tp_statistics": 2}
PARALLEL = {"sp_statistics": "sp2", "tp_statistics": "tp2"}  # their "preset": the parallelism, not a model size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--presets", nargs="+", default=None, help="default: 0.1B 0.3B 1B (smoke with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps: checks the flow, not the speed")
    p.add_argument("--budget_s", type=float, default=450, help="wall-clock budget of the whole suite")
    p.add_argument("--launcher_steps", type=int, default=None, help="launcher and loop steps (default 30, 6 quick)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="V-scale kernels to time")
    p.add_argument("--dataset", default=None, help="data_throughput's corpus (default: the C4 sample, else smoke)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<device>-<time>)")
    args = p.parse_args(argv)
    args.presets = args.presets or (["smoke"] if args.quick else ["0.1B", "0.3B", "1B"])
    args.launcher_steps = args.launcher_steps or (6 if args.quick else 30)
    if args.dataset is None:
        args.dataset = str(C4_SAMPLE) if C4_SAMPLE.is_file() else "smoke"
    args.out = Path(args.out or BENCHMARKS / "results" / f"{args.device}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """The steps of the suite: name, preset, command line, and the most seconds it may take."""
    d = ["--device", args.device]
    steps = []
    for preset in args.presets:
        tiny = ["--batch", "1", "--seq_len", "64", "--steps", "2", "--warmup", "1"] if args.quick else ["--steps", "10"]
        steps.append(("vscale_overhead", preset, [*d, "--preset", preset, "--kernels", *args.kernels, *tiny], 150))
    for preset in args.presets:
        tiny = ["--micro_batch", "1", "--seq_len", "64"] if args.quick else []
        steps.append(("launcher_vs_loop", preset, [*d, "--preset", preset, "--steps", str(args.launcher_steps),
                                                   *tiny], 180))  # fmt: skip
    for preset in args.presets:
        tiny = (["--quick", "--steps", "2", "--warmup", "1", "--batch", "1", "--seq_len", "64", "--seq_lens", "128",
                 "256", "--mem_layers", "1"] if args.quick else ["--steps", "10"])  # fmt: skip
        steps.append(("collector_overhead", preset, [*d, "--preset", preset, *tiny], 150))
    for preset in args.presets:
        tiny = (["--seq_len", "64", "--micro_batch", "2", "--seconds", "1", "--train_steps", "1", "--warmup", "0"]
                if args.quick else ["--seconds", "3"])  # fmt: skip
        steps.append(("data_throughput", preset, [*d, "--preset", preset, "--dataset", args.dataset, *tiny], 60))
    # Last, if the budget allows: where the launcher's time goes (plain vs DeepSpeed engine, per phase).
    tiny = ["--batch", "1", "--seq_len", "64", "--steps", "2", "--warmup", "1"] if args.quick else []
    steps.append(("engine_phases", args.presets[0], [*d, "--preset", args.presets[0], "--stage", "2", *tiny], 90))
    # Then the downstream evaluation's speed (perplexity tokens/s, NIAH samples/s), as is and fake-quantised.
    for preset in args.presets:
        tiny = ["--context", "64", "--batch", "2", "--new_tokens", "4", "--repeats", "1"] if args.quick else []
        steps.append(("evaluate_throughput", preset, [*d, "--preset", preset, *tiny], 90))
    # The statistics under sequence and tensor parallelism, on 2 GPUs (own small model: no preset).
    tiny = ["--quick", "--seq_lens", "128", "256", "--repeats", "1", "--layers", "1"] if args.quick else []
    for name, label in PARALLEL.items():
        steps.append((name, label, [*d, *tiny], 240))
    return [{"name": n, "preset": p, "argv": a, "cap_s": c} for n, p, a, c in steps]


def _result_file(out: Path, name: str, preset: str) -> Path:
    return out / f"{name}_{preset}.json"


def _load(out: Path, name: str, preset: str) -> dict | None:
    path = _result_file(out, name, preset)
    return json.loads(path.read_text()) if path.is_file() else None


def _training_rate(out: Path, preset: str) -> float | None:
    """The launcher's median tokens/s for ``preset`` from this suite's launcher_vs_loop result, if it ran."""
    result = _load(out, "launcher_vs_loop", preset)
    return result["launcher"]["median_tokens_per_s"] if result else None


def run_step(
    step: dict, out: Path, deadline: float, env: dict, missing: dict[str, str] | None = None, gpus: int = 0
) -> dict:
    """Run one step as its own process; ``missing`` maps a module that does not import here to its error, ``gpus``
    is how many GPUs the host has (a step that needs more is skipped, marked ``not_applicable``)."""
    argv = list(step["argv"])
    rate = _training_rate(out, step["preset"]) if step["name"] == "data_throughput" else None
    if rate:  # what the launcher really consumed (per rank); without it, data_throughput times a few steps itself
        argv += ["--train_tokens_per_s", str(rate)]
    result_file = _result_file(out, step["name"], step["preset"])
    log = result_file.with_suffix(".log")
    timeout = min(step["cap_s"], deadline - time.monotonic())
    record = {"name": step["name"], "preset": step["preset"], "argv": argv, "log": log.name}
    need = GPUS.get(step["name"], 0)
    if need > gpus:
        reason = f"needs {need} GPUs, this host has {gpus}"
        print(f"[suite] {step['name']} {step['preset']}: skipped, {reason}", flush=True)
        return {**record, "status": "skipped", "reason": reason, "not_applicable": True, "wall_s": 0.0}
    unmet = [f"{name} ({missing[name]})" for name in NEEDS[step["name"]] if name in (missing or {})]
    if unmet:
        reason = f"needs {', '.join(unmet)}, which does not import here"
        print(f"[suite] {step['name']} {step['preset']}: skipped, {reason}", flush=True)
        return {**record, "status": "skipped", "reason": reason, "wall_s": 0.0}
    if timeout < 20:
        return {**record, "status": "skipped", "reason": "the suite's time budget is spent", "wall_s": 0.0}
    cmd = [sys.executable, str(BENCHMARKS / f"{step['name']}.py"), *argv, "--out", str(result_file)]
    t0 = time.monotonic()
    print(f"[suite] {step['name']} {step['preset']} (at most {timeout:.0f} s)", flush=True)
    with log.open("w") as handle:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if proc.returncode == 0 and result_file.is_file() else "failed"
            reason = None if status == "ok" else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status, reason = "timeout", f"stopped after {timeout:.0f} s"
    record.update(status=status, wall_s=time.monotonic() - t0)
    if status == "ok":
        record["result"] = result_file.name
    else:
        record["reason"] = reason
        record["log_tail"] = log.read_text()[-1500:]
        print(f"[suite] {step['name']} {step['preset']}: {status} ({reason}); log in {log}", flush=True)
    return record


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(out: Path, presets: list[str]) -> str:
    head = (
        "| preset | V-scale ratio eager | fused | launcher tok/s | MFU | loop tok/s | launcher/loop | idle | "
        "capture | every=100 | capture mem T=4096 | data headroom | eval ppl tok/s | NIAH samples/s |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for preset in presets:
        v = _load(out, "vscale_overhead", preset) or {}
        ratios = v.get("ratios", {})
        lvl = _load(out, "launcher_vs_loop", preset) or {}
        launcher, loop = lvl.get("launcher", {}), lvl.get("loop", {})
        c = _load(out, "collector_overhead", preset) or {}
        memory = c.get("memory", {})
        mem = memory.get("4096") or (memory[max(memory, key=int)] if memory else {})
        d = _load(out, "data_throughput", preset) or {}
        e = _load(out, "evaluate_throughput", preset) or {}
        cells = [
            preset,
            _fmt(ratios.get("eager"), ".3f"),
            _fmt(ratios.get("compiled"), ".3f"),
            _fmt(launcher.get("median_tokens_per_s"), ",.0f"),
            _fmt(launcher.get("median_mfu"), ".3f"),
            _fmt(loop.get("median_tokens_per_s"), ",.0f"),
            _fmt(lvl.get("ratio"), ".3f"),
            _fmt(c.get("ratio_idle"), ".4f"),
            _fmt(c.get("ratio_capture"), ".3f"),
            _fmt(c.get("amortised", {}).get("100"), ".4f"),
            _fmt(mem.get("ratio"), ".3f"),
            _fmt(d.get("headroom"), ",.0f"),
            _fmt(e.get("ppl_tokens_per_s", {}).get("none"), ",.0f"),
            _fmt(e.get("niah_samples_per_s", {}).get("none"), ",.1f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parallel_table(out: Path, steps: list[dict]) -> str:
    """The SP/TP statistics benchmarks: capture/normal step time and extra peak memory per rank at each T, with the
    extra memory's growth factor when T doubles (about 2: linear); a step that did not run shows why."""
    rows = ["| benchmark | T | capture/normal time | extra MB per rank | extra growth |", "|---|---|---|---|---|"]
    for step in steps:
        if step["name"] not in PARALLEL:
            continue
        result = _load(out, step["name"], step["preset"]) if step["status"] == "ok" else None
        if not result:
            rows.append(f"| {step['name']} | - | {step['status']}: {step.get('reason', '')} | - | - |")
            continue
        for t, row in result["results"].items():
            growth = result["extra_growth"].get(t)
            rows.append(f"| {step['name']} | {t} | {_fmt(row.get('ratio'), '.3f')} | "
                        f"{_fmt(row.get('extra_mb'), '+.1f')} | {_fmt(growth, '.2f')} |")  # fmt: skip
    return "\n".join(rows)


def environment(device: str, env: dict) -> dict:
    """Versions of what the benchmarks import, probed in a child with the steps' environment; ``missing`` maps each
    optional module that does not import to its error (one line)."""
    code = ("import importlib, json, torch, transformers\n"
            "d = {'torch': torch.__version__, 'transformers': transformers.__version__,"
            " 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,"
            " 'gpus': torch.cuda.device_count(), 'missing': {}}\n"
            f"for name in {sorted({n for needs in NEEDS.values() for n in needs})!r}:\n"
            " try:\n  d[name] = importlib.import_module(name).__version__\n"
            " except Exception as err:\n  d['missing'][name] = f'{type(err).__name__}: {err}'.splitlines()[0][:300]\n"
            "print(json.dumps(d))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    return {**info, "python": platform.python_version(), "cpus": os.cpu_count(), "device": device}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VSP_CACHE", str(out / "cache"))  # the smoke tokenizer, trained once for the whole suite
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s, "quick": args.quick,
               "environment": environment(args.device, env), "steps": []}  # fmt: skip
    if "error" in summary["environment"]:
        last = (summary["environment"]["error"].strip().splitlines() or ["no output"])[-1]
        print(f"error: {sys.executable} cannot import torch and transformers, which every benchmark needs ({last}); "
              "run the suite with the Python that has them (PYTHON=... for gpu_suite.sh)", file=sys.stderr)  # fmt: skip
        return 2
    missing = summary["environment"].get("missing", {})
    for name, error in missing.items():
        print(f"[suite] {name} does not import here: {error}", flush=True)
    for step in plan(args):
        gpus = summary["environment"].get("gpus", 0) if args.device == "cuda" else 0
        summary["steps"].append(run_step(step, out, deadline, env, missing, gpus=gpus))
        (out / "suite.json").write_text(json.dumps(summary, indent=1))
    summary["total_wall_s"] = time.monotonic() - start
    summary["table"] = table(out, args.presets)
    summary["parallel_table"] = parallel_table(out, summary["steps"])
    (out / "suite.json").write_text(json.dumps(summary, indent=1))
    failed = [f"{s['name']} {s['preset']}: {s['status']}" for s in summary["steps"]
              if s["status"] != "ok" and not s.get("not_applicable")]  # fmt: skip
    ok = sum(s["status"] == "ok" for s in summary["steps"])
    print(f"\n[suite] {ok}/{len(summary['steps'])} steps ok in "
          f"{summary['total_wall_s']:.0f} s (budget {args.budget_s:.0f} s); results in {out}", flush=True)  # fmt: skip
    for line in failed:
        print(f"[suite] not ok: {line}", flush=True)
    env_line = summary["environment"]
    print(f"\n{summary['parallel_table']}", flush=True)
    print(f"\n{env_line.get('gpu') or 'CPU'}, torch {env_line.get('torch')}, {summary['date']}", flush=True)
    print(summary["table"], flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
