"""A rank of examples/accelerate_loop.py under Accelerate's DeepSpeed plugin that also records what an independent
check needs: the weights before the first due step (gathered under ZeRO-3), every micro-batch that step's forwards
saw on this rank, and the loop's records.

    VSP_RECORD_DIR=<out dir> deepspeed --num_gpus 2 tests/workers/accelerate_loop.py <examples/accelerate_loop.py flags>
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import accelerate_loop

import vscale_plugin as vsp
from vscale_plugin.launch.distributed import exit_after_distributed
from vscale_plugin.testing.distributed import full_state_dict

out = Path(os.environ["VSP_RECORD_DIR"])
first_due = accelerate_loop.parse_args(sys.argv[1:]).every
inputs: list[torch.Tensor] = []


class RecordingCollector(vsp.StatsCollector):
    """The example's collector (it builds it as vsp.StatsCollector), recording the first due step on the side."""

    def start(self, step: int) -> bool:
        self._recording = step == first_due
        if self._recording:
            weights = full_state_dict(self.model)  # every rank: a collective under ZeRO-3
            if dist.get_rank() == 0:
                torch.save(weights, out / "weights.pt")
                engine = {"type": type(self.target).__name__, "zero_stage": self.target.zero_optimization_stage()}
                (out / "engine.json").write_text(json.dumps(engine))
            self._recorder = self.model.base_model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        return super().start(step)

    def _record_inputs(self, module, args, kwargs) -> None:
        inputs.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).detach().cpu())

    def stop(self) -> dict:
        if self._recording:
            self._recorder.remove()
        return super().stop()


vsp.StatsCollector = RecordingCollector
records = accelerate_loop.main(sys.argv[1:])
torch.save(inputs, out / f"inputs_rank{dist.get_rank()}.pt")
if dist.get_rank() == 0:
    (out / "records.json").write_text(json.dumps(records))
# Tearing down an interpreter that ran gloo collectives can abort it ("terminate called without an active exception",
# exit 250, seen in CI): leave the group and exit the way the launcher's own ranks do.
dist.barrier()
dist.destroy_process_group()
exit_after_distributed(0)
