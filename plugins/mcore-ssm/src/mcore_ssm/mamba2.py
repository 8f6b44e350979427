"""The ``mamba2`` token mixer (Mamba2's SSD layer, as in Nemotron-H), registered as a block.

Shape legend: B rows, T tokens per row, H hidden, S sequences (segments: rows, or documents under
``cu_seqlens``), h heads (nh), p head dim, g groups (ngroups), n ``d_state``, K ``d_conv``,
I inner width ``h * p``, X conv channels ``I + 2 * g * n``.

Notable:
* Projections ``z`` (gate), ``x``, ``B``, ``C`` (per group), ``dt`` (per head, its bias is ``dt_bias``) are
  separate linears (Mamba's fused ``in_proj`` split by rows), so tensor parallelism splits each by whole
  heads (``B``, ``C`` by whole groups: the tp size must divide ``ngroups``, as in Megatron); while the
  weights are plain tensors they run as one GEMM. The per-channel parameters (conv filters, ``A_log``,
  ``D``, the norm scale) are weights of never-called ``nn.Linear`` holders (``ConvFilter``,
  ``block_utils.PerChannel``), split with the same heads; ``forward`` counts heads with ``-1``.
* A causal depthwise conv1d + SiLU over ``[x | B | C]`` (``mcore_ssm.conv``), the scan (the chunked SSD
  form, fp32 state: ``mcore_ssm.mamba2_kernels`` picks the Triton forward on CUDA or the torch
  reference ``mamba2_reference.ssd_chunked``) with the ``D`` skip, then the gated RMSNorm
  ``rmsnorm(y * silu(z)) * weight`` in ``ngroups`` groups (``mcore_ssm.norm``) and ``out_proj``. Where the Triton
  kernels run (``kernel_choice.fused_ops``) the training call's conv + SiLU is ``conv_triton`` and the gated norm
  ``norm_triton`` (fused; ``MCORE_SSM_FUSED=0``: torch).
* Packed documents (``ctx.cu_seqlens``): no conv window and no state crosses a document (or a row end).
* Recurrent state: ``forward_with_state`` takes and returns each sequence's conv and SSM state (prefill,
  chunked prefill); ``step`` is the single-token recurrent update (decode). Under an inference cache
  (``ctx.kv_cache``) ``forward`` reads the layer's state slots, runs the step's new tokens and writes the states
  back (a decode step, ``ctx.max_seqlen == 1`` as in the engine's static-shape steps: one ``step`` of every row,
  the final states once, no host work); ``cache_spec`` declares them.
* Context parallelism: under ``ctx.sequence_split`` (set by ``cp``) an all-to-all gives the conv and scan every
  token of the full rows for ``1 / cp`` of the heads (groups fewer than ``cp`` repeated), another brings them back
  before the gated norm (``_forward_split``).
* Init (declared, ``mcore.params.Init``): projections normal(``init_std``), ``out_proj``
  normal(``output_init_std``), the conv as ``nn.Conv1d`` (uniform +-1/sqrt(K)), ``D`` ones, the norm ones;
  ``A = -exp(A_log)`` log-uniform in ``[a_init_min, a_init_max]`` (Mamba2 draws ``A`` uniform there); the
  ``dt`` bias uniform between ``softplus^-1(dt_min)`` and ``softplus^-1(dt_max)`` (so the initial step lies in
  ``[dt_min, dt_max]``; Mamba2 draws it log-uniform there): ``Init`` kinds a sharded parameter can draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mcore.params import Init, ParamSpec
from mcore.protocols.block import BlockContext, BlockShared, FlopsShape, RecurrentStateSpec
from mcore.sequence_split import SequenceSplit
from mcore_ssm.block_utils import (
    PerChannel,
    check_positive_float,
    check_positive_int,
    draw_declared_,
    local,
    one_token_each,
    per_token_counts,
    project,
    repeat_groups,
    step_tokens,
)
from mcore_ssm.conv import causal_conv1d, causal_conv1d_step
from mcore_ssm.hf_map_mamba2 import Mamba2HF
from mcore_ssm.kernel_choice import check_kernel, fused_ops
from mcore_ssm.mamba2_kernels import ssd_scan
from mcore_ssm.mamba2_reference import discretize_dt
from mcore_ssm.norm import gated_rms_norm
from mcore_ssm.packing import documents

__all__ = ["Mamba2"]


def _inv_softplus(value: float) -> float:
    """``y`` with ``softplus(y) = value`` (> 0)."""
    return value + math.log(-math.expm1(-value))


class ConvFilter(nn.Linear):
    """A depthwise conv filter ``weight (C, K)`` with its ``bias (C,)``, held as an ``nn.Linear`` (as
    ``block_utils.PerChannel``) so the ``tp`` layout splits its channels with the projection they filter.
    Never called as a linear: the block reads ``local(weight)`` and ``local(bias)``."""

    def __init__(self, channels: int, width: int, *, bias: bool) -> None:
        super().__init__(width, channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ConvFilter holds parameters; read its weight and bias instead of calling it")


class Mamba2(nn.Module):
    """Mamba2 (SSD) mixer; ``forward(hidden (B, T, H), ctx) -> (B, T, H)``."""

    hf = Mamba2HF()  # its part of a Hugging Face checkpoint (mcore.hf.HFBlockMapping), found by model families
    carries_sequence_state = True  # a state runs along each document: layouts must not split sequences
    supports_sequence_split = True  # ... unless they pass ``ctx.sequence_split``: the whole sequence, some heads

    @dataclass(kw_only=True, slots=True)
    class Config:
        d_state: int = 128
        """State size per head and group (n): the width of B and C."""
        d_conv: int = 4
        """Width of the causal depthwise conv over x, B, C (>= 2)."""
        expand: int = 2
        """Inner width = expand * hidden_size when num_heads is not given."""
        headdim: int = 64
        """Dims per head (p); the heads are the inner width / headdim."""
        num_heads: int | None = None
        """Heads (none: expand * hidden_size / headdim, which must be whole)."""
        ngroups: int = 1
        """Groups sharing one B and C (and one norm group); must divide the heads."""
        chunk_size: int = 64
        """Tokens per chunk of the chunked scan (the result does not depend on it)."""
        dt_min: float = 0.001
        """Smallest initial step size dt (the dt bias init)."""
        dt_max: float = 0.1
        """Largest initial step size dt (> dt_min)."""
        dt_limit_min: float = 0.0
        """dt is clamped to at least this after the softplus (>= 0)."""
        dt_limit_max: float | None = None
        """dt is clamped to at most this after the softplus (none: no upper limit)."""
        a_init_min: float = 1.0
        """Smallest initial decay rate -A (A = -exp(A_log))."""
        a_init_max: float = 16.0
        """Largest initial decay rate -A (>= a_init_min)."""
        conv_bias: bool = True
        """Bias on the conv channels."""
        norm_eps: float = 1e-5
        """Epsilon of the gated RMSNorm (finite, > 0)."""
        kernel: str = "auto"
        """Scan implementation: 'auto' (Triton forward on CUDA when it imports, else torch), 'torch', 'triton'."""

        def __post_init__(self) -> None:
            for key in ("d_state", "d_conv", "expand", "headdim", "num_heads", "ngroups", "chunk_size"):
                check_positive_int(key, getattr(self, key), allow_none=key == "num_heads")
            for key in ("dt_min", "dt_max", "a_init_min", "a_init_max", "norm_eps", "dt_limit_max"):
                if key != "dt_limit_max" or self.dt_limit_max is not None:
                    check_positive_float(key, getattr(self, key))
            if self.d_conv < 2:
                raise ValueError(f"d_conv = {self.d_conv}: must be >= 2 (the conv state holds d_conv - 1 tokens)")
            if not self.dt_min < self.dt_max:
                raise ValueError(f"dt_min = {self.dt_min}, dt_max = {self.dt_max}: need dt_min < dt_max")
            if not self.a_init_min <= self.a_init_max:
                raise ValueError(
                    f"a_init_min = {self.a_init_min}, a_init_max = {self.a_init_max}: need a_init_min <= a_init_max"
                )
            if not (self.dt_limit_min >= 0 and math.isfinite(self.dt_limit_min)):
                raise ValueError(f"dt_limit_min = {self.dt_limit_min!r}: must be a finite number >= 0")
            if self.dt_limit_max is not None and not self.dt_limit_min < self.dt_limit_max:
                raise ValueError(
                    f"dt_limit_max = {self.dt_limit_max}: must exceed dt_limit_min = {self.dt_limit_min} (or be none)"
                )
            check_kernel(self.kernel)
            if self.num_heads is not None and self.num_heads % self.ngroups:
                raise ValueError(f"ngroups = {self.ngroups}: must divide num_heads = {self.num_heads}")

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        cfg = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        if cfg.num_heads is None and (cfg.expand * hidden_size) % cfg.headdim:
            raise ValueError(
                f"headdim = {cfg.headdim}: must divide expand * hidden_size = {cfg.expand * hidden_size}, or set num_heads"
            )
        heads = cfg.num_heads or cfg.expand * hidden_size // cfg.headdim
        if heads % cfg.ngroups:
            raise ValueError(f"ngroups = {cfg.ngroups}: must divide the {heads} heads")
        self.num_heads, self.head_dim, self.d_state = heads, cfg.headdim, cfg.d_state
        self.norm_group = heads * cfg.headdim // cfg.ngroups  # channels per norm group (one group per B/C group)
        inner, bc = heads * cfg.headdim, cfg.ngroups * cfg.d_state
        self.z_proj = nn.Linear(hidden_size, inner, bias=False)
        self.x_proj = nn.Linear(hidden_size, inner, bias=False)
        self.b_proj = nn.Linear(hidden_size, bc, bias=False)
        self.c_proj = nn.Linear(hidden_size, bc, bias=False)
        self.dt_proj = nn.Linear(hidden_size, heads, bias=True)  # its bias is Mamba's dt_bias
        width = cfg.d_conv
        self.conv_x = ConvFilter(inner, width, bias=cfg.conv_bias)  # (I, K): nn.Conv1d's weight, dim 1 dropped
        self.conv_b = ConvFilter(bc, width, bias=cfg.conv_bias)  # (g*n, K)
        self.conv_c = ConvFilter(bc, width, bias=cfg.conv_bias)  # (g*n, K)
        self.A_log = PerChannel(heads, 1)  # (h, 1): A = -exp(A_log)
        self.D = PerChannel(heads, 1)  # (h, 1): the skip
        self.norm = PerChannel(inner, 1)  # (I, 1): the gated RMSNorm's scale
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.reset_parameters()

    # -- declarations ---------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Roles, inits (module docstring) and tensor parallelism: every projection ``column`` in whole heads
        (``z``, ``x``: ``headdim`` rows; ``B``, ``C``: ``d_state`` rows per group; ``dt``: one row per head, its
        bias with it), ``out_proj`` ``row``. The per-channel parameters (conv filters and biases, ``A_log``,
        ``D``, the norm scale: ``nn.Linear`` weights never called, see ``ConvFilter``) split with the channels
        they act on: ``column`` in the same whole heads; ``forward`` reads each as the rank holds it. Roles:
        the projections ``matrix``; the conv filters, ``A_log``, ``D`` and the ``dt`` bias ``bias``
        (per-channel vectors: no weight decay, as Mamba's ``A_log``, ``D``, ``dt_bias``); the scale ``norm``."""
        cfg = self.config
        std = Init("normal", std=self.shared.init_std)
        bound = 1.0 / math.sqrt(cfg.d_conv)
        conv = Init("uniform", a=-bound, b=bound)
        low, high = math.log(cfg.a_init_min), math.log(cfg.a_init_max)
        a_init = Init("constant", value=low) if low == high else Init("uniform", a=low, b=high)
        dt_init = Init("uniform", a=_inv_softplus(cfg.dt_min), b=_inv_softplus(cfg.dt_max))
        specs = {
            "z_proj.weight": ParamSpec("matrix", head_rows=cfg.headdim, init=std, tp="column"),
            "x_proj.weight": ParamSpec("matrix", head_rows=cfg.headdim, init=std, tp="column"),
            "b_proj.weight": ParamSpec("matrix", head_rows=cfg.d_state, init=std, tp="column"),
            "c_proj.weight": ParamSpec("matrix", head_rows=cfg.d_state, init=std, tp="column"),
            "dt_proj.weight": ParamSpec("matrix", head_rows=1, init=std, tp="column"),
            "dt_proj.bias": ParamSpec("bias", head_rows=1, init=dt_init, tp="column"),
            "out_proj.weight": ParamSpec("matrix", init=Init("normal", std=self.shared.out_std), tp="row"),
            "A_log.weight": ParamSpec("bias", head_rows=1, init=a_init, tp="column"),
            "D.weight": ParamSpec("bias", head_rows=1, init=Init("ones"), tp="column"),
            "norm.weight": ParamSpec("norm", head_rows=cfg.headdim, init=Init("ones"), tp="column"),
        }
        for part, rows in (("x", cfg.headdim), ("b", cfg.d_state), ("c", cfg.d_state)):
            specs[f"conv_{part}.weight"] = ParamSpec("bias", head_rows=rows, init=conv, tp="column")
            if cfg.conv_bias:
                specs[f"conv_{part}.bias"] = ParamSpec("bias", head_rows=rows, init=conv, tp="column")
        return specs

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every parameter from its declared ``init`` (fp32 on the CPU; meta parameters are left alone)."""
        draw_declared_(self, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cache_spec(self) -> RecurrentStateSpec:
        """What the inference cache keeps per sequence (``DeclaresCache``): the conv state ``(X, K - 1)`` in the
        parameters' dtype and the SSM state ``(h, p, n)`` in fp32 (this module's heads: a tp rank's share)."""
        conv_channels = sum(local(conv.weight).shape[0] for conv in (self.conv_x, self.conv_b, self.conv_c))
        heads = local(self.A_log.weight).shape[0]
        return RecurrentStateSpec(
            states={
                "conv": ((conv_channels, self.config.d_conv - 1), self.out_proj.weight.dtype),
                "ssm": ((heads, self.head_dim, self.d_state), torch.float32),
            }
        )

    def flops(self, shape: FlopsShape) -> int:
        cfg = self.config
        hidden = self.out_proj.out_features
        inner, bc, heads = self.num_heads * self.head_dim, cfg.ngroups * cfg.d_state, self.num_heads
        projections = 2 * shape.tokens * hidden * (2 * inner + 2 * bc + heads) + 2 * shape.tokens * inner * hidden
        conv = 2 * shape.tokens * (inner + 2 * bc) * cfg.d_conv
        # chunked scan per token: C B^T and its weighted sum over the chunk, the chunk state and its read-out
        scan = 2 * shape.tokens * (cfg.chunk_size * (bc + inner) + 2 * inner * cfg.d_state)
        return projections + conv + scan

    # -- the network ----------------------------------------------------------------------------
    def _conv_params(self, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight (X, K)`` and ``bias (X,)`` of the conv over ``[x | B | C]`` (this rank's channels), checked
        against the projected ``x (..., I)`` and ``b (..., g*n)``."""
        convs = (self.conv_x, self.conv_b, self.conv_c)
        weights = [local(conv.weight) for conv in convs]
        if weights[0].shape[0] != x.shape[-1] or weights[1].shape[0] != b.shape[-1]:
            raise ValueError(
                f"mamba2: conv filters hold {weights[0].shape[0]} x and {weights[1].shape[0]} B channels for "
                f"{x.shape[-1]} and {b.shape[-1]} projected ones: the tensor-parallel size must divide "
                f"ngroups = {self.config.ngroups}"
            )
        bias = None if self.conv_x.bias is None else torch.cat([local(conv.bias) for conv in convs])  # type: ignore[arg-type]
        return torch.cat(weights), bias

    def _project(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """``[z (.., I), x (.., I), B (.., g*n), C (.., g*n), dt (.., h)]`` (``dt`` with its bias): one GEMM while
        the weights are plain tensors (``block_utils.project``)."""
        return project(hidden, (self.z_proj, self.x_proj, self.b_proj, self.c_proj, self.dt_proj))

    def _dt_limit(self) -> tuple[float, float]:
        cfg = self.config
        return (cfg.dt_limit_min, math.inf if cfg.dt_limit_max is None else cfg.dt_limit_max)

    def _gate_norm_out(self, y: torch.Tensor, z: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
        """``out_proj(rmsnorm(y * silu(z)) * weight)``: ``y``, ``z (..., I)`` -> ``(..., H)``. ``fused``: the norm by
        ``norm_triton`` (whole calls, where ``kernel_choice.fused_ops`` says so)."""
        weight = local(self.norm.weight)[:, 0]  # (I,): this rank's channels
        if weight.shape[0] % self.norm_group:
            raise ValueError(
                f"mamba2: a norm group spans {self.norm_group} channels but this module holds {weight.shape[0]}: "
                f"the tensor-parallel size must divide ngroups = {self.config.ngroups}"
            )
        eps, group = self.config.norm_eps, self.norm_group
        if fused:
            from mcore_ssm.norm_triton import gated_rms_norm_triton

            y = gated_rms_norm_triton(y, z, weight, eps, norm_before_gate=False, group_size=group)
        else:
            y = gated_rms_norm(y, z, weight, eps, norm_before_gate=False, group_size=group)
        return self.out_proj(y.to(z.dtype))

    def forward_with_state(
        self,
        hidden: torch.Tensor,
        ctx: BlockContext,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden (B, T, H)`` after each sequence's ``conv_state (S, X, K - 1)`` and ``ssm_state (S, h, p, n)``
        (zeros when ``None``; one per row, or per document of ``ctx.cu_seqlens``, which then must lie in one
        row each). Returns ``(out (B, T, H), conv_state, ssm_state)``: the states after each sequence."""
        out, conv_final, ssm_final = self._forward(hidden, ctx, conv_state, ssm_state, return_conv_state=True)
        assert conv_final is not None
        return out, conv_final, ssm_final

    def _forward(
        self,
        hidden: torch.Tensor,
        ctx: BlockContext,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        *,
        return_conv_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``forward_with_state``; the conv's final state only with ``return_conv_state`` (without it and without a
        ``conv_state``, the training call, the conv may run fused: ``_scan``)."""
        z, x, b, c, dt = self._project(hidden)  # (B, T, I), (B, T, I), (B, T, g*n) x2, (B, T, h)
        weight, bias = self._conv_params(x, b)  # (X, K), (X,)
        y, conv_final, ssm_final = self._scan(
            x,
            b,
            c,
            dt,
            weight,
            bias,
            local(self.A_log.weight),
            local(self.D.weight),
            ctx,
            conv_state,
            ssm_state,
            return_conv_state=return_conv_state,
        )  # (B, T, I), (S, X, K - 1) or None, (S, h, p, n)
        return self._gate_norm_out(y, z, fused=fused_ops(self.config.kernel, z)), conv_final, ssm_final

    def _scan(
        self,
        x: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        dt: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a_log: torch.Tensor,
        d: torch.Tensor,
        ctx: BlockContext,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        *,
        return_conv_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The conv over ``[x | B | C]`` (``weight (X, K)``, ``bias (X,)``) and the scan with the ``D`` skip:
        ``x (B, T, h*p)``, ``b``, ``c (B, T, g*n)``, ``dt (B, T, h)``, ``a_log``, ``d (h, 1)`` the heads' rows ->
        ``(y (B, T, h*p), conv_state (S, X, K - 1) or None, ssm_state (S, h, p, n))``. The training call (no
        ``conv_state``, none returned) runs the fused Triton conv where ``kernel_choice.fused_ops`` says so."""
        batch, seq, _ = x.shape
        xbc_in = torch.cat([x, b, c], dim=-1)  # (B, T, X)
        conv_final: torch.Tensor | None = None
        if conv_state is None and not return_conv_state and fused_ops(self.config.kernel, x):
            from mcore_ssm.conv_triton import conv1d_silu_train

            cu = ctx.cu_seqlens
            pos = documents(batch, seq, cu, x.device).pos if cu is not None else None  # (N,); rows: t % T
            xbc = conv1d_silu_train(xbc_in, weight, bias, pos=pos)  # (B, T, X)
        else:
            xbc, conv_final = causal_conv1d(
                xbc_in,
                weight,
                bias,
                cu_seqlens=ctx.cu_seqlens,
                initial_state=conv_state,
                activation="silu",
                return_final_state=return_conv_state,
            )
        x, b, c = xbc.split([x.shape[-1], b.shape[-1], c.shape[-1]], dim=-1)
        y, ssm_final = ssd_scan(
            x.reshape(batch, seq, -1, self.head_dim),  # (B, T, h, p): heads counted, a tp rank holds some
            dt,
            -torch.exp(a_log[:, 0].float()),  # (h,)
            b.reshape(batch, seq, -1, self.d_state),  # (B, T, g, n)
            c.reshape(batch, seq, -1, self.d_state),
            d[:, 0],
            dt_limit=self._dt_limit(),
            initial_state=ssm_state,
            cu_seqlens=ctx.cu_seqlens,
            chunk_size=self.config.chunk_size,
            kernel=self.config.kernel,
        )  # (B, T, h, p), (S, h, p, n)
        return y.reshape(batch, seq, -1), conv_final, ssm_final

    def _forward_split(self, hidden: torch.Tensor, ctx: BlockContext, split: SequenceSplit) -> torch.Tensor:
        """Under a sequence split (``cp``): this rank's tokens ``hidden (B, L, H)`` projected, an all-to-all to
        every token of the full rows for ``1 / cp`` of the heads (the heads must divide by ``cp``; with fewer
        groups than ``cp`` each group's ``B``/``C`` channels are repeated, as attention repeats GQA's key/value
        heads, so every rank gets the group its heads read and autograd sums the copies' gradients), the conv
        and the scan on them, the all-to-all back; the gated norm (over ``ngroups`` groups, which may span
        ranks) and ``out_proj`` on this rank's tokens with every head."""
        if ctx.kv_cache is not None:
            raise ValueError("mamba2: an inference cache under a sequence split (cp) is not supported; allowed: cp = 1")
        z, x, b, c, dt = self._project(hidden)  # (B, L, I), (B, L, I), (B, L, g*n) x2, (B, L, h)
        split.check_heads("mamba2 heads", dt.shape[-1])
        weight, bias = self._conv_params(x, b)  # (X, K), (X,)
        groups = b.shape[-1] // self.d_state
        copies = split.size // math.gcd(groups, split.size)  # each group this many times: g * copies divides by cp
        sizes = [x.shape[-1], b.shape[-1], c.shape[-1]]

        def share(per_channel: torch.Tensor) -> torch.Tensor:  # (X, ...) -> this rank's rows of [x | B' | C']
            px, pb, pc = per_channel.split(sizes)
            pb, pc = repeat_groups(pb, groups, copies, 0), repeat_groups(pc, groups, copies, 0)
            return torch.cat([split.my_channels(t) for t in (px, pb, pc)])

        b, c = repeat_groups(b, groups, copies, -1), repeat_groups(c, groups, copies, -1)  # (B, L, g*copies*n)
        x, b, c, dt = split.to_full_sequence(x, b, c, dt)  # (B, T, */cp): every token, this rank's heads
        y, _, _ = self._scan(
            x,
            b,
            c,
            dt,
            share(weight),
            None if bias is None else share(bias),
            split.my_channels(local(self.A_log.weight)),
            split.my_channels(local(self.D.weight)),
            split.full_context(ctx),
            None,
            None,
            return_conv_state=False,
        )  # (B, T, h/cp * p)
        (y_local,) = split.to_local_tokens(y)  # (B, L, I)
        return self._gate_norm_out(y_local, z, fused=fused_ops(self.config.kernel, z))

    def step(
        self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step: ``hidden (S, H)`` the new token of each sequence, ``conv_state (S, X, K - 1)``,
        ``ssm_state (S, h, p, n)`` its state. Returns ``(out (S, H), conv_state, ssm_state)``; the inputs are
        not modified. The same function as ``forward_with_state`` on one token per sequence."""
        count = hidden.shape[0]
        z, x, b, c, dt = self._project(hidden)  # (S, I), (S, I), (S, g*n) x2, (S, h)
        weight, bias = self._conv_params(x, b)
        xbc, conv_next = causal_conv1d_step(torch.cat([x, b, c], dim=-1), conv_state, weight, bias, activation="silu")
        x, b, c = xbc.split([x.shape[-1], b.shape[-1], c.shape[-1]], dim=-1)
        xs = x.reshape(count, -1, self.head_dim).float()  # (S, h, p)
        heads = xs.shape[1]
        rep = heads // (b.shape[-1] // self.d_state)
        bs = b.reshape(count, -1, self.d_state).float().repeat_interleave(rep, dim=1)  # (S, h, n)
        cs = c.reshape(count, -1, self.d_state).float().repeat_interleave(rep, dim=1)  # (S, h, n)
        step = discretize_dt(dt, limit=self._dt_limit())  # (S, h) fp32
        decay = torch.exp(step * -torch.exp(local(self.A_log.weight)[:, 0].float()))  # (S, h)
        state = ssm_state.float() * decay[..., None, None] + (step[..., None] * xs)[..., None] * bs[:, :, None, :]
        y = torch.einsum("shpn,shn->shp", state, cs) + xs * local(self.D.weight)[:, 0].float()[:, None]  # (S, h, p)
        return self._gate_norm_out(y.reshape(count, -1).to(x.dtype), z), conv_next, state

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.sequence_split is not None:
            return self._forward_split(hidden, ctx, ctx.sequence_split)
        cache = ctx.kv_cache
        if cache is None:  # training, or a full forward: every sequence starts from zeros
            return self._forward(hidden, ctx, None, None, return_conv_state=False)[0]
        # inference: the step's new tokens continue each sequence's state in the layer's slots
        states = cache.recurrent_state(ctx.layer_index)  # {"conv": (S, X, K - 1), "ssm": (S, h, p, n)}
        conv_state, ssm_state = states["conv"].to(hidden.device), states["ssm"].to(hidden.device)
        batch, seq, hidden_size = hidden.shape
        if one_token_each(hidden, ctx):  # decode (a static step too): one update of every row, the final states once
            out, conv_next, ssm_next = self.step(hidden.reshape(batch * seq, hidden_size), conv_state, ssm_state)
            final = {"conv": conv_next.to(states["conv"].dtype), "ssm": ssm_next.to(states["ssm"].dtype)}
            cache.set_recurrent_state(ctx.layer_index, final)
            return out.view(batch, seq, hidden_size)
        counts = per_token_counts(batch, seq, ctx.cu_seqlens, ctx.max_seqlen)
        if counts is not None:  # decode / speculative verify: the state after every token
            flat, after = step_tokens(
                self._step_states,
                hidden.reshape(batch * seq, hidden_size),
                counts,
                {"conv": conv_state, "ssm": ssm_state},
            )  # (N, H), {name: (N, *shape)}
            per_token = {name: t.to(states[name].dtype) for name, t in after.items()}
            cache.set_recurrent_state(ctx.layer_index, per_token, per_token=True)
            return flat.view(batch, seq, hidden_size)
        out, conv_next, ssm_next = self.forward_with_state(hidden, ctx, conv_state, ssm_state)
        cache.set_recurrent_state(
            ctx.layer_index, {"conv": conv_next.to(states["conv"].dtype), "ssm": ssm_next.to(states["ssm"].dtype)}
        )
        return out

    def _step_states(
        self, hidden: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``step`` with the state as ``{"conv", "ssm"}`` (``block_utils.step_tokens``' form)."""
        out, conv_next, ssm_next = self.step(hidden, state["conv"], state["ssm"])
        return out, {"conv": conv_next, "ssm": ssm_next}
