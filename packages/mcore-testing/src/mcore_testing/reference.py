"""A tiny decoder-only transformer in plain PyTorch, and tiny deterministic data.

It lets a plugin test itself (layouts, optimizers, precision) without any other plugin.
Shape legend: B batch, T tokens, H hidden, nh heads, hs head size, V vocab.

Its modules declare their parameters' roles, fused layouts and initial distributions
(``mcore.params``), as a model plugin's do: the head is ``lm_head``, ``qkv`` rows are
``[all Q | K | V]`` and ``gate_up`` rows ``[gate | up]``; the declared inits are the
distributions ``reset_parameters`` draws from (so ``mcore.construct.init_params`` can initialise a
copy built on the meta device).

It keeps the parts of the model contract that layouts rely on: positions from the context (a
layout that splits the sequence keeps them global), the context's attention backend when one is
set (``BlockContext.attention``), the loss sum divided by ``ctx.label_count`` (per-rank losses of a
split micro-batch add up to its mean) and pipeline stages under the full model's names
(``StagedModel``: ``TinyStage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import Init, ParamSpec


@dataclass(kw_only=True, slots=True)
class TinyConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    ffn_size: int = 64
    max_seq_len: int = 64
    norm_eps: float = 1e-5
    preset: str | None = None
    fused: bool = True
    """Fused ``qkv`` / ``gate_up`` weights (rows ``[all Q | K | V]``, ``[gate | up]``); ``False``:
    separate ``q``, ``k``, ``v``, ``gate``, ``up`` that declare how tensor parallelism splits them."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention) of the unfused layout; ``None``: ``num_heads``."""


STD = 0.02  # weights' init std; output projections (proj, down) use STD / sqrt(2 * num_layers)


def out_std(cfg: TinyConfig) -> float:
    return STD / math.sqrt(2 * cfg.num_layers)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec("norm", init=Init("ones"))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SplitAttention(nn.Module):
    """Separate ``q``, ``k``, ``v`` projections (GQA with ``num_kv_heads``), each declared
    column-parallel in whole heads, ``proj`` row-parallel: a ``tp`` layout splits them by heads."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.out_std = out_std(cfg)
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k = nn.Linear(cfg.hidden_size, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        column = {"head_rows": self.head_dim, "init": Init("normal", std=STD), "tp": "column"}
        return {
            **{f"{n}.weight": ParamSpec("matrix", **column) for n in ("q", "k", "v")},  # type: ignore[arg-type]
            "proj.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std), tp="row"),
        }

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        B, T, _ = x.shape
        # head counts from the tensors: a tensor-parallel rank holds some of the heads
        q, k, v = (m(x).view(B, T, -1, self.head_dim) for m in (self.q, self.k, self.v))  # (B, T, n, hs)
        backend = getattr(ctx, "attention", None)
        if backend is not None:
            y = backend(q, k, v, ctx=ctx, scale=1.0 / math.sqrt(self.head_dim), window=None)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)  # (B, T, nh, hs)
        return self.proj(y.reshape(B, T, -1))


class SplitMLP(nn.Module):
    """Separate ``gate`` and ``up`` (column-parallel) and ``down`` (row-parallel)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.out_std = out_std(cfg)
        self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "gate.weight": ParamSpec("matrix", init=Init("normal", std=STD), tp="column"),
            "up.weight": ParamSpec("matrix", init=Init("normal", std=STD), tp="column"),
            "down.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std), tp="row"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.out_std = out_std(cfg)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        h = self.qkv.in_features
        splits = (("q", h), ("k", h), ("v", h))
        return {
            "qkv.weight": ParamSpec(
                "matrix", splits=splits, head_rows=h // self.num_heads, init=Init("normal", std=STD)
            ),
            "proj.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std)),
        }

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)  # 3 x (B, T, H)
        q, k, v = (t.view(B, T, self.num_heads, H // self.num_heads) for t in (q, k, v))  # (B, T, nh, hs)
        backend = getattr(ctx, "attention", None)
        if backend is not None:  # a layout's (or engine's) attention: the context's choice
            y = backend(q, k, v, ctx=ctx, scale=1.0 / math.sqrt(H // self.num_heads), window=None)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)  # (B, T, nh, hs)
        return self.proj(y.reshape(B, T, H))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.out_std = out_std(cfg)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        f = self.down.in_features
        return {
            "gate_up.weight": ParamSpec("matrix", splits=(("gate", f), ("up", f)), init=Init("normal", std=STD)),
            "down.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std)),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # 2 x (B, T, F)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn: nn.Module = Attention(cfg) if cfg.fused else SplitAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp: nn.Module = MLP(cfg) if cfg.fused else SplitMLP(cfg)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    """Embedding -> ``num_layers`` pre-norm blocks -> norm -> untied head; learned positions."""

    def __init__(self, cfg: TinyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg = cfg or TinyConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "embed.weight": ParamSpec("embedding", init=Init("normal", std=STD)),
            "pos.weight": ParamSpec("embedding", init=Init("normal", std=STD)),
            "lm_head.weight": ParamSpec("head", init=Init("normal", std=STD)),
        }

    def reset_parameters(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    scale = out_std(self.config) if name.endswith(("proj.weight", "down.weight")) else STD
                    p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        x = embed(self, tokens, ctx)
        for layer in self.layers:
            x = layer(x, ctx)
        return head_loss(self, x, labels, ctx)

    # -- StagedModel ----------------------------------------------------------------------------
    def stage_layers(self) -> int:
        return len(self.layers)

    def pipeline_stage(self, layers: range, *, first: bool, last: bool) -> TinyStage:
        return TinyStage(self, layers, first=first, last=last)


def embed(model: Any, tokens: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Token plus learned position embeddings ``(B, T, H)``; positions from ``ctx`` when it has them."""
    positions = getattr(ctx, "positions", None)
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
    return model.embed(tokens) + model.pos(positions)  # (B, T, H)


def head_loss(model: Any, x: torch.Tensor, labels: torch.Tensor | None, ctx: Any) -> torch.Tensor:
    """Logits ``(B, T, V)``, or the loss: the token losses' sum over ``ctx.label_count`` (the mean without ``ctx``)."""
    logits = model.lm_head(model.norm(x))  # (B, T, V)
    if labels is None:
        return logits
    flat = labels.flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=-100, reduction="sum")
    count = (flat != -100).sum()
    denominator = ctx.label_count(count) if ctx is not None and hasattr(ctx, "label_count") else count.clamp(min=1)
    return total / denominator


class TinyStage(nn.Module):
    """Pipeline stage of a ``TinyTransformer``: the model's own modules under the model's names.

    ``layers`` is a ``ModuleDict`` keyed by the layer's index in the whole model, so a parameter
    is ``layers.3.mlp.down.weight`` on whichever stage holds it.
    """

    def __init__(self, model: TinyTransformer, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed, self.pos = model.embed, model.pos
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def forward(
        self, inputs: torch.Tensor, *, tokens: torch.Tensor, labels: torch.Tensor | None = None, ctx: Any = None
    ) -> torch.Tensor:
        x = embed(self, inputs, ctx) if self.first else inputs  # (B, T, H)
        for layer in self.layers.values():
            x = layer(x, ctx)
        return head_loss(self, x, labels, ctx) if self.last else x


def tiny_batches(
    steps: int, *, batch_size: int = 4, seq_len: int = 16, vocab_size: int = 64, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``(tokens, labels)``, each ``(batch_size, seq_len)`` int64.

    Rows are arithmetic sequences modulo the vocabulary with a random start and stride, so a
    model can learn them and the loss visibly falls.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab_size, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        seq = (start + stride * torch.arange(seq_len + 1)) % vocab_size  # (B, T + 1)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


class TinyModelFactory:
    """Registers ``TinyTransformer`` as model ``reference-tiny`` (a ``ModelFactory``)."""

    Config = TinyConfig

    @staticmethod
    def presets() -> dict[str, dict[str, Any]]:
        return {"tiny": {}, "micro": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32}}

    @staticmethod
    def build(config: TinyConfig, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> nn.Module:
        return TinyTransformer(config, seed=seed).to(device)

    @staticmethod
    def flops_per_token(config: TinyConfig, seq_len: int) -> int:
        """6 x matmul parameters + 6 x attention scores (12 * L * H * T / 2 causal) per token."""
        h, f, layers = config.hidden_size, config.ffn_size, config.num_layers
        matmul_params = layers * (4 * h * h + 3 * h * f) + h * config.vocab_size
        return 6 * matmul_params + 6 * layers * h * seq_len
