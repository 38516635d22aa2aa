#!/usr/bin/env bash
# The benchmark suite on a single-GPU host without network, in one command (about 8 minutes):
#   bash benchmarks/gpu_suite.sh [--out DIR] [--presets 0.1B 0.3B 1B] [any benchmarks/suite.py flag]
# It needs DeepSpeed, mlflow-skinny and datasets beside the host's PyTorch and transformers. Where they are missing it
# installs the wheels in ${VSP_WHEELS:-.whl} (built beforehand, where pip reaches PyPI, by
# `bash benchmarks/gpu_wheels.sh .whl`) into /tmp/site with pip --no-index, then runs benchmarks/suite.py: JSON
# results in --out (default benchmarks/results/cuda-<time>) and a table printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import deepspeed, mlflow, datasets" 2>/dev/null; then
    wheels=${VSP_WHEELS:-.whl}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed, mlflow or datasets is missing and $wheels holds no wheels; build them where pip" \
             "reaches PyPI with 'bash benchmarks/gpu_wheels.sh $wheels' and bring $wheels here" >&2
        exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
# mlflow-skinny has no SQL store: the launcher logs to a file store unless MLFLOW_TRACKING_URI says otherwise.
export MLFLOW_ALLOW_FILE_STORE=${MLFLOW_ALLOW_FILE_STORE:-true}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$py" benchmarks/suite.py --device "${VSP_SUITE_DEVICE:-cuda}" "$@"
