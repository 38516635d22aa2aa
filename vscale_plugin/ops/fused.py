"""The fused V-scale kernel: :func:`~vscale_plugin.ops.vscale.vscale_values` compiled by ``torch.compile``.

Eager PyTorch runs V-scale as several element-wise kernels forward and backward; compiled, inductor fuses
them. The math is ``vscale_values`` itself (SPEC 1), so the eager function stays the reference. Mode "backward" uses
this same compiled phi*v for its gradient (``VScale.forward`` then returns v's own values, see
:func:`~vscale_plugin.ops.vscale.backward_only_values`), so every mode runs on either kernel. Compiling is
optional and best-effort: when it is impossible here (no C++ compiler or Triton, an unsupported Python or backend, a
dynamo error, dynamo's recompile limit), one warning names the cause and the eager kernel serves the rest of the
process. PyTorch may defer compiling the backward graph to the first ``backward()``; an error there is not caught.

The compiled function is module state, built on first use and never stored on modules, so models deep-copy, pickle
and save as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from vscale_plugin.ops.vscale import vscale_values

_compiled: Callable[..., torch.Tensor] | None = None
_fallback_reason: str | None = None  # set once compiling failed; the eager kernel is used from then on


def _compile() -> Callable[..., torch.Tensor]:
    # dynamic=True: one graph for every batch size and sequence length (training, prefill, decoding) instead of a
    # recompilation per shape. torch.compile is lazy: compilation errors surface at the first call, not here.
    return torch.compile(vscale_values, dynamic=True, fullgraph=True)


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _fall_back(err: Exception) -> None:
    global _fallback_reason
    _fallback_reason = _first_line(err)
    if err.__cause__ is not None:  # dynamo wraps the real reason, e.g. "Hard failure due to fullgraph=True"
        _fallback_reason += f" <- {_first_line(err.__cause__)}"
    warnings.warn(
        f"vscale_plugin: the compiled V-scale kernel is unavailable ({_fallback_reason}); the eager kernel is used "
        "instead for the rest of this process (same values up to float rounding). Pass kernel='eager' to "
        "vscale_plugin.apply_vscale or set_vscale_kernel to choose it explicitly.",
        RuntimeWarning,
        stacklevel=3,
    )


def compiled_vscale_values(v: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """:func:`~vscale_plugin.ops.vscale.vscale_values` through ``torch.compile`` (compiled once per process, on the
    first call), or the eager function after compiling failed once.
    """
    global _compiled
    if _fallback_reason is not None or torch.compiler.is_compiling():
        # Inside a compiled model the surrounding torch.compile traces (and fuses) the eager function itself.
        return vscale_values(v, c)
    try:
        if _compiled is None:
            _compiled = _compile()
        return _compiled(v, c)
    except Exception as err:
        # Eager first: if the inputs themselves are wrong, it raises the user's error and the kernel stays enabled.
        out = vscale_values(v, c)
        _fall_back(err)
        return out
