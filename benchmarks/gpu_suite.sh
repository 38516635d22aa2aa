#!/usr/bin/env bash
# The benchmark suite on a single-GPU host without network, in one command (about 8 minutes):
#   bash benchmarks/gpu_suite.sh [--out DIR] [--presets 0.1B 0.3B 1B] [any benchmarks/suite.py flag]
# It needs DeepSpeed, mlflow-skinny and datasets beside the host's PyTorch and transformers. Where they are missing it
# installs the wheels in ${VSP_WHEELS:-.whl} (built beforehand, where pip reaches PyPI, by
# `bash benchmarks/gpu_wheels.sh .whl`) into ${VSP_SITE:-/tmp/site} with pip --no-index, then runs benchmarks/suite.py: JSON
# results in --out (default benchmarks/results/cuda-<time>) and a table printed last. A benchmark whose needs still
# do not import (datasets without pyarrow, say) is reported as skipped with the import error; the others run.
# The statistics under sequence and tensor parallelism (benchmarks/sp_statistics.py, tp_statistics.py) start 2
# ranks: on a host with fewer than 2 GPUs they are reported as skipped ("needs 2 GPUs, this host has 1"), not failed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# Which of the three do not import here (one interpreter start: importing DeepSpeed takes seconds). Imports may
# print (DeepSpeed logs to stdout), so the answer is the last line.
missing=$("$py" - 2>/dev/null <<'PY' | tail -n 1
import importlib
missing = []
for name in ("deepspeed", "mlflow", "datasets"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print("missing:", *missing)
PY
) || { echo "error: $py does not run; set PYTHON to the host's Python (the one with PyTorch)" >&2; exit 2; }
missing=${missing#missing:}
if [ -n "${missing// /}" ]; then
    wheels=${VSP_WHEELS:-.whl}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed, mlflow or datasets is missing and $wheels holds no wheels; build them where pip" \
             "reaches PyPI with 'bash benchmarks/gpu_wheels.sh $wheels' and bring $wheels here" >&2
        exit 2
    fi
    # What the host already imports stays the host's: its datasets, say, works with its own pyarrow, where ours
    # might ask for a newer one.
    skip=()
    [[ $missing == *deepspeed* ]] || skip+=(deepspeed-)
    [[ $missing == *mlflow* ]] || skip+=(mlflow_skinny- mlflow-)
    [[ $missing == *datasets* ]] || skip+=(datasets- dill- multiprocess- xxhash-)
    install=()
    for wheel in "$wheels"/*.whl; do
        keep=1
        for prefix in "${skip[@]}"; do
            if [[ $(basename "$wheel") == "$prefix"* ]]; then keep=0; fi
        done
        if ((keep)); then install+=("$wheel"); fi
    done
    site=${VSP_SITE:-/tmp/site}
    "$py" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${install[@]}"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$site/bin:$PATH
fi
# mlflow-skinny has no SQL store: the launcher logs to a file store unless MLFLOW_TRACKING_URI says otherwise.
export MLFLOW_ALLOW_FILE_STORE=${MLFLOW_ALLOW_FILE_STORE:-true}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$py" benchmarks/suite.py --device "${VSP_SUITE_DEVICE:-cuda}" "$@"
