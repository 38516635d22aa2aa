"""What a statistics capture step costs per rank under DeepSpeed AutoTP (``tensor_parallel.autotp_size`` 2), against T.

    python benchmarks/tp_statistics.py --device cpu --quick        # 2 CPU ranks over gloo, T = 512..4096, minutes
    python benchmarks/tp_statistics.py --device cuda               # 2 GPUs over nccl, bf16

The measurement of ``benchmarks/sp_statistics.py`` (read its docstring: flags, arms, the memory method and the JSON)
with tensor parallelism instead of sequence parallelism, set up as ``tests/workers/tensor_parallel.py`` does: both
ranks see the whole sequence of T tokens and hold half of the attention heads (DeepSpeed shards q/k/v/o and the MLP),
and the collector combines the model's parts over the TP group. The claim measured is the same: a capture step's
extra memory and time stay O(T) per rank (``extra_growth`` about 2 when T doubles, 4 if a T x T matrix appeared).
The last line printed is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.sp_statistics import main as _main


def main(argv: list[str] | None = None) -> dict | None:
    return _main(argv, mode="tp", script=Path(__file__).resolve())


if __name__ == "__main__":
    main()
