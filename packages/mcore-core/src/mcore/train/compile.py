"""``[train] compile``: torch.compile each block of the model, applied from outside like recompute.

Each block's ``forward`` is replaced on the instance by its compiled version (``torch.compile``
of the bound method), so parameter names and checkpoints do not change, hooks a layout registers
on the block later (FSDP's gathers) stay outside the compiled graph, and a block already wrapped
for recompute is compiled with its checkpoint (torch.compile traces non-reentrant checkpoints).
The model's code never knows. Blocks are found as recompute finds them (``find_blocks``).
"""

from __future__ import annotations

from torch import nn

from mcore.errors import ConfigError
from mcore.train.recompute import BLOCK_LISTS, find_blocks


def apply_compile(model: nn.Module, mode: str, *, backend: str = "inductor") -> int:
    """Compile every block (``mode = 'blocks'``); returns how many were compiled."""
    if mode == "none":
        return 0
    import torch

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(
            f"train.compile_backend = {backend!r} is not a torch.compile backend; allowed: {', '.join(sorted(backends))}"
        )
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(
            f"train.compile = {mode!r}: the model has no ModuleList named {' / '.join(BLOCK_LISTS)} to compile; "
            "use train.compile = 'none'"
        )
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)  # type: ignore[method-assign]
    return len(blocks)
