"""A rank of examples/hf_trainer.py (or, with VSP_EXAMPLE=trl_sft, examples/trl_sft.py) that also records what an
independent check needs: the weights before the first due step (gathered under ZeRO-3), every micro-batch of that
step, and the Trainer's log history.

    VSP_RECORD_DIR=<out dir> deepspeed --num_gpus 2 tests/workers/trainer_callback.py <the example's flags>
"""

import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from vscale_plugin.launch.distributed import exit_after_distributed
from vscale_plugin.testing.distributed import full_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
example = importlib.import_module(os.environ.get("VSP_EXAMPLE", "hf_trainer"))  # or trl_sft

out = Path(os.environ["VSP_RECORD_DIR"])
args = example.parse_args(sys.argv[1:])
due = args.every  # the first captured step
recorded: list[dict] = []
state = {"recording": False}


class Recorder(TrainerCallback):
    def on_step_begin(self, args, st, control, model=None, **kwargs):
        state["recording"] = st.global_step + 1 == due
        if state["recording"]:
            weights = full_state_dict(model)
            if st.is_world_process_zero:
                torch.save(weights, out / "weights.pt")

    def on_step_end(self, args, st, control, **kwargs):
        state["recording"] = False


trainer = example.build_trainer(args, callbacks=[Recorder()])
step = trainer.training_step


def training_step(model, inputs, *rest, **kwargs):
    if state["recording"]:
        recorded.append({k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    return step(model, inputs, *rest, **kwargs)


trainer.training_step = training_step
decayed = trainer.get_decay_parameter_names(trainer.model)
trainer.train()
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save(recorded, out / f"inputs_rank{rank}.pt")
if rank == 0:
    final = full_state_dict(trainer.model)
    (out / "result.json").write_text(
        json.dumps(
            {
                "log_history": trainer.state.log_history,
                "decayed": decayed,
                "zero_stage": trainer.model_wrapped.zero_optimization_stage(),
                "theta_after": {k: v.tolist() for k, v in final.items() if ".vscale." in k},
            }
        )
    )
else:
    full_state_dict(trainer.model)  # a collective under ZeRO-3
# Tearing down an interpreter that ran gloo collectives can abort it ("terminate called without an active exception",
# exit 250, seen in CI): leave the group and exit the way the launcher's own ranks do.
dist.barrier()
dist.destroy_process_group()
exit_after_distributed(0)
