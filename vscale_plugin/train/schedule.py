"""The learning-rate schedule of the paper's recipe: linear warm-up to the peak, then cosine decay to min_lr."""

from __future__ import annotations

import math
from collections.abc import Callable

from vscale_plugin.train.recipe import Preset


def lr_lambda(recipe: Preset) -> Callable[[int], float]:
    """The schedule as a factor of the peak lr per step, for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up
    over ``warmup`` steps, then cosine decay to ``min_lr`` at ``max_steps`` (and ``min_lr`` after it)."""
    floor = recipe.min_lr / recipe.lr

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = min(1.0, (step - recipe.warmup) / max(1, recipe.max_steps - recipe.warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
