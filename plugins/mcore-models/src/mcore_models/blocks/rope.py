"""Rotary position embeddings: inverse frequencies for each scaling variant, and cos/sin per token.

Variants (``rope_scaling``): ``none`` (base ``rope_theta``; a larger base is "ABF"), ``linear``
(positions divided by ``rope_factor``), ``llama3`` (Llama 3.1 band-wise scaling), ``yarn``
(NTK-by-parts interpolation plus an attention factor on cos/sin). ``rotary_fraction < 1`` rotates
only the first ``fraction * head_dim`` dims of each head (partial rotary).

Positions come from ``BlockContext.positions``, so packed documents restart at 0. Frequencies are
computed on the CPU in fp32 in the same order of operations as Hugging Face ``transformers``, so
imported checkpoints give the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


@dataclass(kw_only=True, slots=True)
class RopeFields:
    """RoPE settings shared by the attention blocks' configs (names match the model config).

    A subclass's ``__post_init__`` calls ``check_rope`` with its own section name.
    """

    rope_theta: float = 10000.0
    """RoPE base (a larger base is "ABF"; finite, > 0)."""
    rope_scaling: str = "none"
    """RoPE scaling: 'none', 'linear' (positions / rope_factor), 'llama3' (Llama 3.1 band-wise) or 'yarn'."""
    rope_factor: float = 1.0
    """Context-extension factor of 'linear', 'llama3' and 'yarn' scaling (finite, > 0)."""
    rope_original_max_positions: int = 8192
    """'llama3' / 'yarn': the context length before extension (> 0)."""
    rope_low_freq_factor: float = 1.0
    """'llama3': wavelengths above original_max_positions / this are divided by rope_factor (> 0)."""
    rope_high_freq_factor: float = 4.0
    """'llama3': wavelengths below original_max_positions / this are kept (> rope_low_freq_factor)."""
    rope_beta_fast: float = 32.0
    """'yarn': rotations where the ramp from interpolation to extrapolation ends (> 0)."""
    rope_beta_slow: float = 1.0
    """'yarn': rotations where that ramp starts (> 0)."""
    rope_mscale: float = 0.0
    """'yarn': DeepSeek's mscale of the attention factor (>= 0; 0 with rope_mscale_all_dim 0: the default factor)."""
    rope_mscale_all_dim: float = 0.0
    """'yarn': DeepSeek's mscale_all_dim (>= 0); MLA also scales its softmax by it."""
    rope_attention_factor: float | None = None
    """'yarn': multiplier of cos and sin (none: derived from rope_factor and the mscales)."""
    rotary_fraction: float = 1.0
    """Fraction of each head's dims that RoPE rotates (partial rotary), in (0, 1]; must give an even count."""


def check_rope(cfg: RopeFields, owner: str, head_dim: int | None = None) -> None:
    """``ValueError`` naming ``owner.<key>`` for a RoPE setting that cannot work.

    ``head_dim``: the dims per head that RoPE rotates a fraction of (checked when given).
    """
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling = {cfg.rope_scaling!r}: allowed: {', '.join(ROPE_SCALINGS)}")
    positive = ["rope_theta", "rope_factor", "rope_original_max_positions"]
    if cfg.rope_scaling == "llama3":
        positive += ["rope_low_freq_factor"]
    if cfg.rope_scaling == "yarn":
        positive += ["rope_beta_fast", "rope_beta_slow", "rope_attention_factor"]
    for key in positive:
        value = getattr(cfg, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{key} = {value!r}: must be a finite number > 0")
    for key in ("rope_mscale", "rope_mscale_all_dim"):
        value = getattr(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{key} = {value!r}: must be a finite number >= 0")
    high, low = cfg.rope_high_freq_factor, cfg.rope_low_freq_factor
    if cfg.rope_scaling == "llama3" and not (high > low and math.isfinite(high)):
        raise ValueError(
            f"rope_high_freq_factor = {high!r}: must be finite and greater than rope_low_freq_factor = {low!r}"
        )
    if not 0 < cfg.rotary_fraction <= 1:
        raise ValueError(f"rotary_fraction = {cfg.rotary_fraction!r}: must be in (0, 1]")
    if head_dim is not None:
        rotary_dim(cfg, head_dim, owner)


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    return 1.0 / (theta**exponents)  # (dim/2,)


def _llama3_inv_freq(cfg: RopeFields, dim: int) -> torch.Tensor:
    inv = _default_inv_freq(cfg.rope_theta, dim)
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_positions
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(cfg: RopeFields) -> float:
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return _yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return _yarn_mscale(cfg.rope_factor)


def _yarn_inv_freq(cfg: RopeFields, dim: int) -> torch.Tensor:
    base, factor = cfg.rope_theta, cfg.rope_factor

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(cfg.rope_original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return interpolation * (1 - extra_factor) + extrapolation * extra_factor


def rotary_dim(cfg: RopeFields, head_dim: int, owner: str = "attention") -> int:
    """Dims of a head that RoPE rotates: ``head_dim * rotary_fraction``, which must be positive and even."""
    dim = int(head_dim * cfg.rotary_fraction)
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"rotary_fraction = {cfg.rotary_fraction!r} gives {dim} rotated dims of head_dim {head_dim}; "
            "it must give a positive even number"
        )
    return dim


def inverse_frequencies(cfg: RopeFields, dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq (dim/2,) fp32 on CPU, attention factor)`` for ``dim`` rotated dims."""
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling = {cfg.rope_scaling!r}: allowed: {', '.join(ROPE_SCALINGS)}")
    if cfg.rope_scaling == "llama3":
        return _llama3_inv_freq(cfg, dim), 1.0
    if cfg.rope_scaling == "yarn":
        return _yarn_inv_freq(cfg, dim), yarn_attention_factor(cfg)
    inv = _default_inv_freq(cfg.rope_theta, dim)
    return (inv / cfg.rope_factor, 1.0) if cfg.rope_scaling == "linear" else (inv, 1.0)


class Rotary(nn.Module):
    """``positions (B, T) -> (cos, sin)``, each ``(B, T, rd/2)`` fp32 with the attention factor applied.

    The inverse frequencies are kept out of the module's buffers, so ``model.to(bfloat16)``
    cannot round them; a copy is made once per device.

    The last call's result is kept and returned again for the same ``positions`` tensor (the same object, not
    modified since): a model whose layers share one ``Rotary`` (``share_rotaries``) computes the tables once per
    call instead of once per layer (a decode step: five small kernels a layer fewer). Not while compiling.
    """

    def __init__(self, cfg: RopeFields, head_dim: int) -> None:
        super().__init__()
        self.dim = rotary_dim(cfg, head_dim)
        self._inv_freq, self.attention_factor = inverse_frequencies(cfg, self.dim)  # (rd/2,) fp32, CPU
        self._on_device = self._inv_freq
        self._last: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def same_tables(self, other: Rotary) -> bool:
        """Whether ``other`` gives the same ``(cos, sin)`` for every position (so one module can serve both)."""
        return (
            self.dim == other.dim
            and self.attention_factor == other.attention_factor
            and torch.equal(self._inv_freq, other._inv_freq)
        )

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        compiling = torch.compiler.is_compiling()
        memo = not compiling and not positions.is_inference()  # (an inference tensor has no version counter)
        if memo and last is not None and last[0] is positions and last[1] == positions._version:
            return last[2]
        if self._on_device.device != positions.device:
            self._on_device = self._inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * self._on_device  # (B, T, rd/2)
        if self.attention_factor == 1.0:
            tables = freqs.cos(), freqs.sin()
        else:
            tables = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        if memo:
            self._last = (positions, positions._version, tables)
        return tables


def share_rotaries(model: nn.Module) -> int:
    """Point every ``rotary`` submodule of ``model`` at the first one that gives the same tables (``Rotary`` holds no
    parameters or buffers: state dicts are unchanged), so the layers of one call share its tables. Returns how
    many were replaced."""
    kept: list[Rotary] = []
    replaced = 0
    for module in list(model.modules()):
        rotary = getattr(module, "rotary", None)
        if not isinstance(rotary, Rotary):
            continue
        same = next((r for r in kept if r.same_tables(rotary)), None)
        if same is None:
            kept.append(rotary)
        elif same is not rotary:
            module.rotary = same
            replaced += 1
    return replaced
