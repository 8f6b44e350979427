"""Multi-token prediction module (DeepSeek-V3 style), one per extra prediction depth.

Shape legend: B rows, T tokens, H hidden.

Depth ``k`` combines the previous depth's hidden state ``h`` (the main model's last hidden state
for ``k = 1``) with the embedding of token ``t[i + k]``: ``proj([norm(emb); norm(h)])``, runs one
transformer layer and hands the result, after its own final norm, to the model's shared output
head to predict ``t[i + k + 1]``. The embeddings arrive in ``ctx.extra[NEXT_EMBEDDINGS]`` of the
view the model makes for depth ``k`` (``ctx.for_layer(num_layers + k - 1, extra=...)``: read-only,
its own layer index for the KV cache and auxiliary losses), so the module keeps the common block
signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcore.params import Init, ParamSpec
from mcore.protocols.block import BlockContext, BlockShared, FlopsShape
from mcore_models.blocks.base import Block, check_positive
from mcore_models.blocks.norms import RMSNorm

NEXT_EMBEDDINGS = "mcore_models.mtp.next_embeddings"


class MTP(Block):
    """``forward(hidden (B, T, H), ctx) -> (B, T, H)``; ``ctx.extra[NEXT_EMBEDDINGS]`` is ``(B, T, H)``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        norm_eps: float = 1e-5
        """Epsilon of the embedding and hidden-state norms (finite, > 0)."""

        def __post_init__(self) -> None:
            check_positive("mtp", "norm_eps", self.norm_eps)

    def __init__(
        self,
        config: Config | None = None,
        *,
        hidden_size: int,
        layer: nn.Module | None = None,
        shared: BlockShared | None = None,
    ) -> None:
        super().__init__()
        cfg = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        norm_cfg = RMSNorm.Config(norm_eps=cfg.norm_eps)
        self.embed_norm = RMSNorm(norm_cfg, hidden_size=hidden_size)
        self.hidden_norm = RMSNorm(norm_cfg, hidden_size=hidden_size)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layer: Any = layer if layer is not None else nn.Identity()
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """``proj`` is a hidden matrix (its columns are ``[embedding | hidden]``); the norms and the
        layer declare their own (``mcore.params``). Tensor parallelism: ``proj`` ``replicate`` (whole on
        every rank: it maps the whole hidden states to the whole input of the depth's layer)."""
        return {"proj.weight": ParamSpec("matrix", init=Init("normal", std=self.shared.init_std), tp="replicate")}

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        embedded = ctx.extra[NEXT_EMBEDDINGS]  # (B, T, H)
        mixed = self.proj(torch.cat([self.embed_norm(embedded), self.hidden_norm(hidden)], dim=-1))  # (B, T, H)
        return self.layer(mixed, ctx) if not isinstance(self.layer, nn.Identity) else mixed

    def flops(self, shape: FlopsShape) -> int:
        layer_flops = self.layer.flops(shape) if hasattr(self.layer, "flops") else 0
        return 2 * shape.tokens * self.proj.in_features * self.proj.out_features + layer_flops
