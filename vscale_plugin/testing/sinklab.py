"""Reference curves of the sink laboratory, as torchtitan keeps loss curves: the per-step training losses and the
statistics at every statistics step of the ``sinklab`` baseline and V-scale runs (fp32, 2 CPU ranks, ZeRO-2),
stored in ``tests/data/sinklab_reference.json``. ``tests/test_sinklab_reference.py`` reruns the first steps of each
run through the real launcher and compares them with the stored curves, so a change that breaks V-scale's effect,
the statistics or the data fails CI.

Refresh the reference (about half an hour on 2 CPU cores: the sinklab study of baseline, learned and fixed
V-scale, then their curves from MLflow, and the study's report beside them):

    python -m vscale_plugin.testing.sinklab --write tests/data/sinklab_reference.json

Every run here holds the CPU kernels at one instruction set (:data:`KERNELS`: AVX2 for torch's own kernels, MKL's and
oneDNN's). Without that the curves were those of one CPU: on an AVX-512 host the default kernels round differently in
the 8th digit after a few steps, and sink formation grows that into different statistics (the baseline's
gs/ratio/L00 at step 300 was 2.9 there against 12.8 on the AVX2 host that made the reference; with the kernels held
at AVX2 the AVX-512 host repeats the reference). So any x86-64 CPU with AVX2 repeats the curves to float32 rounding,
and the comparison's tolerances (:data:`LOSS_RTOL`, :data:`STATS_RTOL`) stay far below the gap between the baseline
and V-scale. Other CPUs cannot run these kernels (:func:`kernels_unavailable` says why).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vscale_plugin.testing import metric_history

# Statistics kept in the reference: the sink, massive-activation, gradient-sink and V-scale families per layer and
# their summaries (the gradient-reshaping ratios and parameter-gradient norms are left out: many numbers, no claim).
STATS_PREFIXES = ("as/", "ma/", "gs/ratio", "gs/grad_in", "gs/v/", "vscale/phi")
# A rerun's losses may differ from the reference by this relative amount at each step ...
LOSS_RTOL = 0.02
# ... and each statistic by this relative amount (plus STATS_ATOL for values near zero).
STATS_RTOL = 0.15
STATS_ATOL = 0.02
REFERENCE_MODES = ("off", "learned", "fixed")
# The instruction set of every CPU kernel of a sinklab run (torch's vectorised kernels, MKL's BLAS, oneDNN): set in the
# environment of the launcher, before torch loads.
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the kernels held at :data:`KERNELS`."""
    return {**(os.environ if base is None else base), **KERNELS}


def kernels_unavailable() -> str | None:
    """Why this CPU cannot run the reference's kernels (not x86-64, or no AVX2); None where it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the reference curves are AVX2 kernels' and this CPU is {platform.machine()}"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None  # no /proc/cpuinfo to ask: try
    return None if "avx2" in flags.split() else "the reference curves are AVX2 kernels' and this CPU has no AVX2"


def curves(client, run_id: str) -> dict[str, Any]:
    """One run's curves: ``loss`` per step, and at each statistics step every kept statistic."""
    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics if k.startswith(STATS_PREFIXES))
    stats: dict[int, dict[str, float]] = {}
    for key in keys:
        for step, value in metric_history(client, run_id, key).items():
            stats.setdefault(step, {})[key] = value
    return {
        "loss": {str(s): v for s, v in sorted(metric_history(client, run_id).items())},
        "stats": {str(s): stats[s] for s in sorted(stats)},
    }


def compare(actual: dict[str, Any], reference: dict[str, Any], label: str) -> list[str]:
    """What differs beyond the tolerances, one line each, for the steps ``actual`` has; [] when it matches."""
    problems = []
    for step, value in actual["loss"].items():
        expected = reference["loss"].get(step)
        if expected is None:
            problems.append(f"{label}: step {step} is not in the reference")
        elif not math.isclose(value, expected, rel_tol=LOSS_RTOL):
            problems.append(f"{label}: train/loss at step {step} is {value:.5g}, the reference {expected:.5g}")
    for step, values in actual["stats"].items():
        expected = reference["stats"].get(step, {})
        missing = sorted(set(expected) - set(values))
        if missing:
            problems.append(f"{label}: step {step} lacks {len(missing)} statistics, e.g. {missing[:3]}")
        for key, value in values.items():
            if key not in expected:
                problems.append(f"{label}: {key} at step {step} is not in the reference")
            elif not math.isclose(value, expected[key], rel_tol=STATS_RTOL, abs_tol=STATS_ATOL):
                problems.append(f"{label}: {key} at step {step} is {value:.4g}, the reference {expected[key]:.4g}")
    return problems


def pretrain_command(mode: str, save_dir: Path, experiment: str, run_name: str, *extra: str) -> list[str]:
    """A sinklab run through the real launcher on 2 CPU ranks, as the reference was made."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "vscale_plugin.train",
        "--ds_config", "zero2", "--preset", "sinklab", "--vscale", mode, "--save_dir", str(save_dir),
        "--experiment", experiment, "--run_name", run_name, *extra,
    ]  # fmt: skip


def write_reference(path: Path, out: Path, experiment: str | None = None) -> dict[str, Any]:
    """Run the sinklab study (baseline, learned and fixed V-scale; report in ``out``) and store its curves; with
    ``experiment``, read the curves of a sinklab study already in that MLflow experiment instead."""
    import torch
    from mlflow import MlflowClient

    from vscale_plugin.apps import study
    from vscale_plugin.tracking import default_tracking_uri
    from vscale_plugin.train.recipe import PRESETS

    if experiment is None:
        unavailable = kernels_unavailable()
        if unavailable:
            raise SystemExit(f"{unavailable}; the reference is unchanged")
        os.environ.update(KERNELS)  # for the study's launcher processes
        experiment = f"sinklab-reference-{time.strftime('%Y%m%d-%H%M%S')}"
        code = study.run(["--preset", "sinklab", "--experiment", experiment, "--out", str(out),
                          "--modes", ",".join(REFERENCE_MODES)])  # fmt: skip
        if code != 0:
            raise SystemExit(f"the sinklab study failed (exit {code}); the reference is unchanged")
    client = MlflowClient(default_tracking_uri())
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string="tags.preset = 'sinklab' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    runs: dict[str, str] = {}
    for run in found:  # the newest finished run of each mode (the comparison run has no preset tag)
        runs.setdefault(run.data.tags["vscale"], run.info.run_id)
    missing = [mode for mode in REFERENCE_MODES if mode not in runs]
    if missing:
        raise SystemExit(f"experiment {experiment} has no finished sinklab run of --vscale {', '.join(missing)}")

    reference = {
        "made_with": {
            "command": "python -m vscale_plugin.testing.sinklab --write " + str(path),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            # The curves depend on the CPU's floating-point kernels (SIMD width, summation order): rounding that
            # differs in the 8th digit after a few steps grows, through sink formation, into different statistics.
            "cpu": _cpu_model(),
            "kernels": KERNELS,
            "preset": PRESETS["sinklab"].as_dict(),
            "ranks": 2,
            "ds_config": "zero2",
        },
        "runs": {mode: curves(client, runs[mode]) for mode in REFERENCE_MODES},
    }
    path.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    return reference


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vscale_plugin.testing.sinklab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--write", type=Path, required=True, help="the reference file to (re)write")
    p.add_argument("--out", type=Path, default=None, help="the study's checkpoints and report (default: a temp dir)")
    p.add_argument(
        "--from_experiment",
        default=None,
        help="read the curves of a sinklab study already in this MLflow experiment instead of running one",
    )
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="sinklab-"))
    write_reference(args.write, out, args.from_experiment)
    report = "" if args.from_experiment else f"; the study's report in {out / 'report' / 'report.md'}"
    print(f"sinklab: reference curves in {args.write}{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
