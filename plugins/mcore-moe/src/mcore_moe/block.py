"""The ``moe`` block: a mixture of SwiGLU experts in a model's MLP position.

Shape legend: B rows, T tokens per row, N = B * T tokens, H hidden size, E experts, K experts per
token, E_l experts on this rank, M rows routed to them, F expert FFN size, F_s shared FFN size.

``forward``: the router picks K experts per token (``mcore_moe.router``), the dispatcher moves the rows
to their experts (``allgather`` at ep=1: local, no communication; a layout swaps ``self.dispatcher`` and
shards ``experts`` for ep > 1), the experts run as grouped GEMMs (``mcore_moe.experts``), the dispatcher
combines the weighted outputs, and the shared experts (a dense SwiGLU over every token) are added, scaled per
token by ``sigmoid(shared_gate(x))`` with ``shared_expert_gate`` (Qwen3-Next's ``shared_expert_gate``).
With ``chunk_tokens`` the routed rows go through the experts in chunks, each recomputed in backward,
so at most one chunk's ``(rows, F)`` activations are alive (same result). Settings: ``[model.moe]``.
Under an inference cache (``ctx.kv_cache`` set) the routed part runs ``mcore_moe.inference`` instead: dropless,
static shapes (``allgatherv``, static grouped GEMMs), no host sync, no aux losses or counts (CUDA-graph capturable).
Each training forward (not a recompute, not evaluation) counts the rows kept per expert, the dropped
slots and the auxiliary losses; the step's counts are set aside after the optimizer step and, on the
steps the run logs, ``step_metrics`` sums them over the ranks that saw distinct tokens
(``mcore.protocols.step.ReportsStepMetrics``): ``moe/<layer>/load/<e>`` (expert e's share of the kept
rows times E: 1 is balanced), ``moe/<layer>/max_load``, ``moe/<layer>/dropped_fraction`` and
``moe/<layer>/aux/<name>`` (the mean over the step's calls), into ``metrics.jsonl`` and TensorBoard.
Under ``tp`` each rank of the group routes its own share of the tokens (``split_tokens_over``, set by the
``ep`` layout): the auxiliary losses are the mean of the ranks' (capacity too is per rank), the loads their sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mcore.errors import ConfigError
from mcore.params import Init, ParamSpec
from mcore.protocols.block import BlockContext, BlockShared, FlopsShape
from mcore.protocols.dispatcher import DispatchResult, TokenDispatcher
from mcore_moe.dispatcher import AllGatherDispatcher, AllGatherVDispatcher, AllToAllDispatcher
from mcore_moe.experts import GroupedSwiGLU, SwiGLU, storage_less
from mcore_moe.hash_router import HashRouter, HashRouterConfig
from mcore_moe.hf_map import MoEHF
from mcore_moe.inference import inference_dispatcher, static_moe
from mcore_moe.router import DROPPED, RouterConfig, TopKRouter, check_router, expert_counts

#: Routers the block builds by name (``router``).
ROUTERS = ("topk", "hash")
#: Dispatchers the block builds by name (``dispatcher``); ep > 1 is the ``ep`` layout's business.
DISPATCHERS: dict[str, Callable[[Any, int], TokenDispatcher]] = {
    "allgather": AllGatherDispatcher,
    "alltoall": AllToAllDispatcher,
    "allgatherv": AllGatherVDispatcher,
}


@dataclass(kw_only=True, slots=True)
class MoEConfig(RouterConfig):
    """The ``[model.moe]`` table: the router's settings (``RouterConfig``) and the experts'."""

    router: str = "topk"
    """'topk' (scores choose the experts) or 'hash' (a token-id table chooses them; needs hash_vocab_size)."""
    hash_vocab_size: int | None = None
    """Rows of the hash router's table: the model's vocabulary size (router = 'hash' only)."""
    moe_ffn_hidden_size: int = 512
    """F: hidden size of each routed expert."""
    num_shared_experts: int = 0
    """Shared experts every token goes through (one dense SwiGLU of num_shared_experts * shared_ffn_hidden_size)."""
    shared_ffn_hidden_size: int | None = None
    """Hidden size of each shared expert (none: moe_ffn_hidden_size)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid of a learned (1, H) projection of the input
    (Qwen3-Next); needs num_shared_experts >= 1."""
    dispatcher: str = "allgather"
    """Token dispatcher: 'allgather', 'alltoall' or 'allgatherv' (static shapes, no host sync; without an ep layout
    all are local)."""
    chunk_tokens: int | None = None
    """Routed rows per expert chunk, recomputed in backward to cap activation memory (none: one chunk)."""
    swiglu_limit: float | None = None
    """Clamped SwiGLU in the routed experts: silu(min(gate, a)) * clamp(up, -a, a) with a = this (> 0; none: plain)."""

    def __post_init__(self) -> None:
        check_router(self)
        for key in (
            "moe_ffn_hidden_size",
            "num_shared_experts",
            "shared_ffn_hidden_size",
            "chunk_tokens",
            "hash_vocab_size",
        ):
            value = getattr(self, key)
            low = 0 if key == "num_shared_experts" else 1
            if value is None and key not in ("moe_ffn_hidden_size", "num_shared_experts"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.moe.{key} = {value!r}: must be an int >= {low}")
        limit = self.swiglu_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0):
            raise ConfigError(f"model.moe.swiglu_limit = {limit!r}: must be a number > 0 (or none)")
        if self.router not in ROUTERS:
            raise ConfigError(f"model.moe.router = {self.router!r}: allowed: {', '.join(ROUTERS)}")
        if self.router == "hash" and self.hash_vocab_size is None:
            raise ConfigError("model.moe.hash_vocab_size = None: router = 'hash' needs the vocabulary size")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError(
                "model.moe.shared_expert_gate = true: needs num_shared_experts >= 1 (got 0); set it or the gate off"
            )
        if self.dispatcher not in DISPATCHERS:
            raise ConfigError(f"model.moe.dispatcher = {self.dispatcher!r}: allowed: {', '.join(DISPATCHERS)}")


def _router(c: MoEConfig, hidden_size: int) -> TopKRouter | HashRouter:
    if c.router == "topk":
        return TopKRouter(c, hidden_size=hidden_size)
    assert c.hash_vocab_size is not None
    config = HashRouterConfig(
        num_experts=c.num_experts,
        top_k=c.top_k,
        vocab_size=c.hash_vocab_size,
        score_function=c.score_function,
        normalize=c.normalize,
        routed_scaling_factor=c.routed_scaling_factor,
    )
    return HashRouter(config, hidden_size=hidden_size)


class MoE(nn.Module):
    """Router + dispatcher + grouped SwiGLU experts (+ shared experts); registered as block ``moe``."""

    Config = MoEConfig
    hf = MoEHF()  # its part of a Hugging Face checkpoint (mcore.hf.HFBlockMapping), found by model families

    def __init__(self, config: MoEConfig | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        self.config = c = config or MoEConfig()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        self.router: TopKRouter | HashRouter = _router(c, hidden_size)
        self.dispatcher: TokenDispatcher = DISPATCHERS[c.dispatcher](
            None, c.num_experts
        )  # a layout swaps it for ep > 1
        self.experts = GroupedSwiGLU(c.num_experts, hidden_size, c.moe_ffn_hidden_size, swiglu_limit=c.swiglu_limit)
        shared_ffn = c.num_shared_experts * (c.shared_ffn_hidden_size or c.moe_ffn_hidden_size)
        self.shared_experts = SwiGLU(hidden_size, shared_ffn) if shared_ffn else None
        #: (1, H): the shared experts' per-token sigmoid gate (``shared_expert_gate``)
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if c.shared_expert_gate else None
        self._counts: torch.Tensor | None = None  # this step's (E + 2 + A,): kept rows per expert, slots, dropped, aux
        self._last_step: torch.Tensor | None = None  # the same of the step that ended last
        self._aux_names: tuple[str, ...] = ()  # A: names of the auxiliary losses counted
        self._layer_index = self.shared.layer_index  # in the metric names; the context's when it has one
        #: ranks that each route a share of this rank's tokens (``split_tokens_over``); ``None``: all of them here
        self.token_group: Any = None
        self.reset_parameters()

    def split_tokens_over(self, group: Any) -> None:
        """Each rank of ``group`` routes its own share of the tokens (``tp`` splitting them, set by the ``ep``
        layout): auxiliary losses become their mean over the group, expert loads and metrics its sum."""
        self.token_group = group
        self.router.token_group = group

    # -- declarations --------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Router ``(E, H)`` role ``router`` (replicated under TP); expert weights role ``expert`` (dim 0 the
        experts): ``gate``/``up`` column-parallel, ``down`` row-parallel; the shared experts plain matrices; the
        shared experts' gate ``(1, H)`` role ``router`` (a per-token score, not a hidden matrix: Muon and muP leave it
        alone), normal(``init_std``), replicated like the router."""
        std, out = Init("normal", std=self.shared.init_std), Init("normal", std=self.shared.out_std)
        specs = {
            "router.weight": ParamSpec("router", init=std, tp="replicate"),
            "experts.gate": ParamSpec("expert", init=std, tp="column"),
            "experts.up": ParamSpec("expert", init=std, tp="column"),
            "experts.down": ParamSpec("expert", init=out, tp="row"),
        }
        if self.shared_experts is not None:
            specs |= {
                "shared_experts.gate.weight": ParamSpec("matrix", init=std, tp="column"),
                "shared_experts.up.weight": ParamSpec("matrix", init=std, tp="column"),
                "shared_experts.down.weight": ParamSpec("matrix", init=out, tp="row"),
            }
        if self.shared_gate is not None:
            specs["shared_gate.weight"] = ParamSpec("router", init=std, tp="replicate")  # a score, like the router
        return specs

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(``init_std``) inputs, normal(``output_init_std``) outputs, drawn on the CPU from ``generator``."""
        for name, spec in self.param_specs().items():
            param = self.get_parameter(name)
            if not param.is_meta and spec.init is not None:
                param.copy_(torch.randn(param.shape, generator=generator) * float(spec.init.std or 0.0))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.router.reset_buffers()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, shape: FlopsShape) -> int:
        """Active parameters only: the router, K experts and the shared experts per token (2 per multiply-add)."""
        c, h = self.config, self.shared.hidden_size
        shared = 3 * h * self.shared_experts.gate.out_features if self.shared_experts is not None else 0
        shared += h if self.shared_gate is not None else 0
        return 2 * shape.tokens * (h * c.num_experts + c.top_k * 3 * h * c.moe_ffn_hidden_size + shared)

    # -- the network -----------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        b, t, h = hidden.shape
        x = hidden.reshape(b * t, h)  # (N, H)
        token_ids = ctx.token_ids.reshape(-1) if ctx is not None and ctx.token_ids is not None else None
        planning = storage_less(x)
        # under an inference cache: dropless routing, static shapes, no host sync (``mcore_moe.inference``)
        inference = ctx is not None and ctx.kv_cache is not None and not planning
        routing = self.router.route(x, token_ids, num_sequences=b, inference=inference)
        aux = [] if inference else self.router.aux_losses()
        if self.token_group is not None and aux:  # each tp rank routed a share of the tokens: their mean
            from mcore_moe.comm import mean_over_ranks

            aux = [(name, mean_over_ranks(loss, self.token_group)) for name, loss in aux]
        for name, loss in aux:
            if ctx is None:
                raise RuntimeError(f"moe: auxiliary loss {name!r} needs a BlockContext with an AuxLosses collector")
            ctx.add_aux_loss(name, loss)
        if inference:
            out = static_moe(inference_dispatcher(self.dispatcher, self.config.num_experts), self.experts, x, routing)
        else:
            # ``mcore plan`` runs on tensors without storage, where a data-dependent shape cannot be known: the
            # static-shape local dispatcher (N * min(K, E) rows, the dropless total) stands in for the real one
            dispatcher = AllGatherVDispatcher(None, self.config.num_experts) if planning else self.dispatcher
            result = dispatcher.dispatch(x, routing)
            out = dispatcher.combine(self._experts(result, ctx), result)  # (N, H)
        if self.shared_experts is not None:
            shared_out = self.shared_experts(hidden)  # (B, T, H): tp may split its tokens
            if self.shared_gate is not None:  # per-token sigmoid gate (B, T, 1)
                shared_out = shared_out * torch.sigmoid(self.shared_gate(hidden))
            out = out + shared_out.reshape(b * t, h)
        if not planning and not inference:
            self._record(routing.experts, [loss for _, loss in aux], ctx)
        return out.view(b, t, h).to(hidden.dtype)

    def _experts(self, result: DispatchResult, ctx: BlockContext | None) -> torch.Tensor:
        """The experts over ``result.tokens`` ``(M, H)``, in chunks of ``chunk_tokens`` rows when set."""
        chunk = self.config.chunk_tokens
        rows, counts = result.tokens, result.tokens_per_expert
        if chunk is None or rows.shape[0] <= chunk:
            return self.experts(rows, counts, ctx)
        ends = torch.cumsum(counts, 0)  # (E_l,) end row of each expert
        starts = ends - counts
        outs = []
        for a in range(0, rows.shape[0], chunk):
            z = min(a + chunk, rows.shape[0])
            part = (ends.clamp(a, z) - starts.clamp(a, z)).to(counts.dtype)  # (E_l,) rows of each expert in [a, z)
            if torch.is_grad_enabled():
                outs.append(checkpoint(self.experts, rows[a:z], part, ctx, use_reentrant=False))
            else:
                outs.append(self.experts(rows[a:z], part, ctx))
        return torch.cat(outs)  # (M, H)

    @torch.no_grad()
    def _record(self, experts: torch.Tensor, aux: list[torch.Tensor], ctx: BlockContext | None) -> None:
        """Add a training call's kept rows per expert, slots, dropped slots and auxiliary losses to the step's
        counts, on the device (no host sync; a recompute during backward and evaluation count nothing)."""
        if not self.training or torch._C._current_graph_task_id() != -1:
            return
        chosen = experts.reshape(-1)  # (N*K,)
        dropped = chosen == DROPPED
        load = expert_counts(chosen.clamp(min=0), self.config.num_experts, (~dropped).float())  # (E,)
        slots = torch.tensor([float(chosen.numel())], device=load.device)
        losses = [loss.detach().float().reshape(1).to(load.device) for loss in aux]
        counts = torch.cat([load, slots, dropped.sum().float().reshape(1), *losses, torch.ones(1, device=load.device)])
        self._aux_names = tuple(name for name, _ in self.router.aux_losses())
        if ctx is not None and ctx.layer_index is not None:
            self._layer_index = ctx.layer_index
        self._counts = counts if self._counts is None else self._counts + counts

    @torch.no_grad()
    def after_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, applied: bool) -> None:
        """Set the finished step's counts aside for ``step_metrics`` and start the next step's (no collective)."""
        self._last_step, self._counts = self._counts, None

    @torch.no_grad()
    def step_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The last step's expert loads, dropped fraction and mean auxiliary losses, summed over the ranks that
        saw distinct tokens (``reduce``: every rank calls it once, with the same shape)."""
        if self._last_step is None:
            return {}
        e = self.config.num_experts
        summed = reduce(self._last_step.clone())
        if self.token_group is not None:
            from mcore_moe.comm import sum_over_ranks

            summed = sum_over_ranks(summed, self.token_group)
        total = summed.tolist()
        load, slots, dropped, aux, calls = total[:e], total[e], total[e + 1], total[e + 2 : -1], total[-1]
        kept = sum(load)
        prefix = "moe" if self._layer_index is None else f"moe/{self._layer_index}"
        relative = [n * e / kept if kept else 0.0 for n in load]  # 1.0: balanced
        out = {f"{prefix}/load/{i}": value for i, value in enumerate(relative)}
        out[f"{prefix}/max_load"] = max(relative)
        out[f"{prefix}/dropped_fraction"] = dropped / slots if slots else 0.0
        out |= {f"{prefix}/aux/{name}": value / calls for name, value in zip(self._aux_names, aux)}
        return out
