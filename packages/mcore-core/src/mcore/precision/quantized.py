"""A gathered weight that stays in its recipe's format (bytes + scales) all the way to the GEMM.

A sharding layout gathers a low-precision recipe's payload (``PrecisionRecipe.gather_payload``)
and asks the recipe to ``unpack`` it. A plain tensor answer is copied into the layout's
high-precision buffer (the weight dequantised); a ``QuantizedWeight`` answer is not: the layout
attaches it to the parameter (``attach``) for as long as the parameter is gathered, and the GEMM
modules the recipe put in the model (``prepare``) read it with ``compute_weight`` and run their
scaled GEMM on the bytes and scales themselves. Without an attached weight (one device, no
sharding layout, or a layout without payload support) those modules quantise their own parameter,
so they behave alike with and without the layout.

Gradients still flow to the parameter object (the module passes it to its autograd function), so
the layout's reduction of them is unchanged. The attached object lives on the parameter tensor
itself, not in any table: there is no global state, and it goes when the layout detaches it at
re-shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_ATTRIBUTE = "_mcore_quantized_weight"


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """``tensors``: the recipe's gathered payload (e.g. fp8 bytes and scales, each gathered along dim 0);
    ``metadata``: what the recipe needs to read them; ``shape``: the weight's shape (set by the layout:
    the tensors may cover more rows, zero padding of the last rank, of which consumers use the first
    ``shape[0]``); ``dtype``: the dtype of the weight it stands for."""

    tensors: tuple[torch.Tensor, ...]
    metadata: Any
    shape: torch.Size
    dtype: torch.dtype


def attach(param: torch.Tensor, weight: QuantizedWeight) -> None:
    """Hand ``weight`` to whatever computes with ``param`` until ``detach``."""
    setattr(param, _ATTRIBUTE, weight)


def detach(param: torch.Tensor) -> None:
    """Forget the attached weight (the layout re-sharded ``param``)."""
    if hasattr(param, _ATTRIBUTE):
        delattr(param, _ATTRIBUTE)


def compute_weight(param: torch.Tensor) -> QuantizedWeight | None:
    """The quantized weight a layout attached to ``param``, or ``None``: compute from ``param`` itself."""
    weight = getattr(param, _ATTRIBUTE, None)
    return weight if isinstance(weight, QuantizedWeight) else None
