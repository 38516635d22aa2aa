#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh needs on an offline GPU host that has CPython 3.12 (x86-64 Linux) with PyTorch and
# transformers: the team's wheelhouse (DeepSpeed, pydantic, hjson, mlflow-skinny and its dependencies) plus Hugging
# Face datasets with its small pure-Python and C needs (dill, multiprocess, xxhash), about 20 MB. datasets also needs
# pyarrow >= 24 and pandas, which are left out: pyarrow alone is a 55 MB wheel and the device's carry holds 64 MiB.
# On a host without them the suite still runs the V-scale and collector benchmarks and reports the launcher and
# data steps as skipped, naming the import error.
#   usage (where pip reaches PyPI, from the repository root):  bash benchmarks/gpu_wheels.sh [DEST=.whl]
#   then carry DEST to the GPU host; gpu_suite.sh installs it with pip --no-index into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
shared=${VSP_SHARED:-../shared}
if [ ! -f "$shared/tools/wheelhouse.sh" ]; then
    echo "error: $shared/tools/wheelhouse.sh not found; set VSP_SHARED to the team's shared folder" >&2
    exit 2
fi
bash "$shared/tools/wheelhouse.sh" "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "datasets==${DATASETS_VERSION:-5.2.0}" "dill==0.4.1" "multiprocess==0.70.19" \
    "xxhash==${XXHASH_VERSION:-4.1.0}"
du -sh "$dest"
