"""Activation recompute, applied to a model from outside (the model code never knows).

``full`` recomputes each block: every child of the model's ``layers`` (or ``blocks``)
``ModuleList`` runs under ``torch.utils.checkpoint`` and keeps only its input. ``selective``
recomputes only the attention sub-module of each block (the part whose activations grow
fastest with sequence length), found by its name (``attn``, ``attention``, ``self_attn``).
The forward is wrapped on the instance, so parameter names (and checkpoints) do not change.
The recompute in backward calls the block again with the arguments of its forward, so it relies on
the block contract (``mcore.protocols.block``): each layer call gets its own frozen ``BlockContext``
view (same layer index the second time) and an auxiliary loss added again replaces its entry in the
call's ``AuxLosses``, so neither the loss, the gradients nor the auxiliary losses change.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from mcore.errors import ConfigError

BLOCK_LISTS = ("layers", "blocks", "h")
ATTENTION_NAMES = ("attn", "attention", "self_attn", "self_attention", "mixer")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the first ``ModuleList`` (or ``ModuleDict``: a pipeline stage
    keeps the model's layer indices as keys) named like ``layers``."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and name.split(".")[-1] in BLOCK_LISTS:
            return list(module.values()) if isinstance(module, nn.ModuleDict) else list(module)
    return []


def _wrap(module: nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Wrap the blocks (``full``) or their attention (``selective``); returns how many modules."""
    if mode == "none":
        return 0
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(
            f"train.recompute = {mode!r}: the model has no ModuleList named {' / '.join(BLOCK_LISTS)} to recompute; "
            "use train.recompute = 'none'"
        )
    targets = blocks
    if mode == "selective":
        targets = [getattr(b, n) for b in blocks for n in ATTENTION_NAMES if isinstance(getattr(b, n, None), nn.Module)]
        if not targets:
            raise ConfigError(
                f"train.recompute = 'selective': the blocks have no attention child named {', '.join(ATTENTION_NAMES)}; "
                "use 'full' or 'none'"
            )
    for t in targets:
        _wrap(t)
    return len(targets)
