"""Which parameters weight decay must spare: V-scale's theta, biases, norms (SPEC section 8).

``transformers.Trainer`` decays every parameter that ``Trainer.get_decay_parameter_names`` returns:
``transformers.trainer_pt_utils.get_parameter_names(model, [nn.LayerNorm], patterns)``, i.e. everything outside an
``nn.LayerNorm`` module whose lower-cased name matches none of ``bias``, ``layernorm``, ``rmsnorm``, ``.norm.`` and
``_norm``. Embeddings and ``lm_head`` are decayed, which is also the paper's recipe. Theta
(``...self_attn.vscale.theta``) is neither a bias nor in a norm module, so Trainer decays it: weight decay then
pulls every lambda = exp(theta) towards 1 and fights the very parameter V-scale learns.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vscale_plugin.ops.vscale import VScale


def _is_norm(module: nn.Module) -> bool:
    # By type name, as transformers' own _init_weights does: every family prefixes its RMSNorm (LlamaRMSNorm,
    # Gemma2RMSNorm, Qwen3RMSNorm for the q/k norms), and StarCoder2 uses nn.LayerNorm.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def no_decay_parameter_names(model: nn.Module) -> list[str]:
    """The names, as ``model.named_parameters()`` gives them, of the parameters weight decay must spare.

    Those are every learned V-scale theta (in fixed and backward mode theta is a buffer, not a parameter), every
    bias, every parameter of a norm module (RMSNorm / LayerNorm of any architecture, recognised by type) and any
    other parameter with fewer than two dimensions: weight decay acts on matrices only, the paper's recipe.
    Embeddings and ``lm_head`` are decayed as ``transformers.Trainer`` decays them; unlike Trainer's default
    (see the module docstring) theta is spared.

    ``model`` may be a plain module or one wrapped by DDP or ``deepspeed.initialize``: the names then carry the
    wrapper's ``module.`` prefix, exactly as the wrapper's ``named_parameters()`` does. Only names and shapes are
    read (a ZeRO-3 partition's full shape from ``ds_shape``), never data, so no gathering is needed.
    """
    names = []
    for module_name, module in model.named_modules():
        spare_all = isinstance(module, VScale) or _is_norm(module)
        for param_name, param in module.named_parameters(recurse=False):
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions keep their full shape here
            if spare_all or param_name == "bias" or len(shape) < 2:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The two optimiser parameter groups of ``model``'s trainable parameters: ``weight_decay`` on the decayed ones,
    0 on :func:`no_decay_parameter_names`. A hand-written loop's one-line fix::

        optimizer = torch.optim.AdamW(vsp.decay_parameter_groups(model, 0.1), lr=1e-3)
    """
    spared = set(no_decay_parameter_names(model))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in spared else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
