"""The ``mamba2`` block's part of a Hugging Face checkpoint: ``Mamba2.hf``, an ``mcore.hf.HFBlockMapping``.

Shape legend: H hidden size, h heads, p head dim, I = h p inner width, g groups, n state size, K conv width,
X = I + 2 g n conv channels.

A model plugin's family (``nemotron_h``) maps the skeleton and hands this mapping a Mamba layer's module
(``model.layers.i.mixer.``); this module maps ``[model.mamba2]`` <-> the Mamba keys of ``config.json`` and our
tensors <-> ``NemotronHMamba2Mixer``'s. Hugging Face fuses the input projection: ``in_proj`` rows
``[z (I) | x (I) | B (g n) | C (g n) | dt (h)]`` are our ``z_proj``, ``x_proj``, ``b_proj``, ``c_proj`` and
``dt_proj`` (split by rows, in that order: values copied, never changed); ``dt_bias`` is ``dt_proj.bias``;
``conv1d.weight (X, 1, K)`` and ``conv1d.bias (X,)`` over ``[x | B | C]`` are ``conv_x``, ``conv_b``, ``conv_c``;
``A_log``, ``D`` ``(h,)`` are ``A_log.weight``, ``D.weight`` ``(h, 1)``; ``norm.weight (I,)`` is ``norm.weight
(I, 1)``; ``out_proj`` is ``out_proj``. The gated norm's epsilon is ``layer_norm_epsilon`` (shared with the
model's norms: the family checks they agree). ``time_step_min``/``max`` are ``dt_min``/``dt_max`` (init only),
``time_step_limit`` the dt clamp (an infinite bound is written as ``transformers`` writes it, ``{"__float__":
"Infinity"}``, and read in either form). ``kernel`` is how we compute, not what: not written, the default on import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # mamba2.py imports this module for ``Mamba2.hf``
    from mcore_ssm.mamba2 import Mamba2

#: Model types this mapping reads and writes.
MODEL_TYPES = ("nemotron_h",)


def _check_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type = {model_type!r}: the mamba2 block maps {', '.join(MODEL_TYPES)}")


def _read_float(key: str, value: Any) -> float:
    """A number of ``config.json``, or ``transformers``' encoding of a special float (``{"__float__": "Infinity"}``)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = {"Infinity": math.inf, "-Infinity": -math.inf}.get(value["__float__"], value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"config.json {key} = {value!r}: allowed: a number")
    return float(value)


def _write_float(value: float) -> Any:
    """``value`` as ``transformers`` writes it into ``config.json`` (infinities as ``{"__float__": ...}``)."""
    return {"__float__": "Infinity" if value > 0 else "-Infinity"} if math.isinf(value) else value


def _sizes(config: Mamba2.Config, hidden: int) -> tuple[int, int, int, int]:
    """``(h, p, g, n)`` of ``config`` in a model of hidden size ``hidden``."""
    heads = config.num_heads or config.expand * hidden // config.headdim
    return heads, config.headdim, config.ngroups, config.d_state


class Mamba2HF:
    """``mcore.hf.HFBlockMapping`` of the ``mamba2`` block for ``nemotron_h`` (``NemotronHMamba2Mixer``)."""

    # -- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], model_type: str) -> Mamba2.Config:
        """``[model.mamba2]`` of ``config.json``; ``ValueError`` naming a key whose value does not map."""
        from mcore_ssm.mamba2 import Mamba2

        _check_type(model_type)
        if hf.get("mamba_hidden_act", "silu") != "silu":
            raise ValueError(f"config.json mamba_hidden_act = {hf['mamba_hidden_act']!r}: allowed: silu")
        if hf.get("use_bias", False):
            raise ValueError("config.json use_bias = true: allowed: false (mamba2's in/out projections have no bias)")
        limit = hf.get("time_step_limit") or (0.0, math.inf)
        if not isinstance(limit, (list, tuple)) or len(limit) != 2:
            raise ValueError(f"config.json time_step_limit = {limit!r}: allowed: [low, high]")
        low, high = (_read_float("time_step_limit", value) for value in limit)
        return Mamba2.Config(
            d_state=hf.get("ssm_state_size", 128),
            d_conv=hf.get("conv_kernel", 4),
            expand=hf.get("expand", 2),
            headdim=hf.get("mamba_head_dim", 64),
            num_heads=hf.get("mamba_num_heads", 128),
            ngroups=hf.get("n_groups", 8),
            chunk_size=hf.get("chunk_size", 128),
            dt_min=hf.get("time_step_min", 0.001),
            dt_max=hf.get("time_step_max", 0.1),
            dt_limit_min=float(low),
            dt_limit_max=None if math.isinf(high) else float(high),
            conv_bias=bool(hf.get("use_conv_bias", True)),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )

    def config_to_hf(self, config: Mamba2.Config, model_type: str) -> dict[str, Any]:
        """The Mamba keys of ``config.json`` (and the norm's ``layer_norm_epsilon``); ``ValueError`` when
        ``num_heads`` is unset (the mapping does not see the hidden size, and ``mamba_num_heads`` needs it)."""
        _check_type(model_type)
        if config.num_heads is None:
            raise ValueError(
                f"model cannot be exported as Hugging Face {model_type!r}: mamba2.num_heads = None (needs it set: "
                "it is mamba_num_heads)"
            )
        high = math.inf if config.dt_limit_max is None else config.dt_limit_max
        return {
            "ssm_state_size": config.d_state,
            "conv_kernel": config.d_conv,
            "expand": config.expand,
            "mamba_head_dim": config.headdim,
            "mamba_num_heads": config.num_heads,
            "n_groups": config.ngroups,
            "chunk_size": config.chunk_size,
            "time_step_min": config.dt_min,
            "time_step_max": config.dt_max,
            "time_step_limit": [config.dt_limit_min, _write_float(high)],
            "use_conv_bias": config.conv_bias,
            "use_bias": False,
            "mamba_hidden_act": "silu",
            "layer_norm_epsilon": config.norm_eps,
        }

    # -- weights ---------------------------------------------------------------------------------
    def state_from_hf(
        self, take: Callable[[str], torch.Tensor], config: Mamba2.Config, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Our tensors (relative to the block) read through ``take`` (names relative to ``mixer.``)."""
        _check_type(model_type)
        in_proj = take("in_proj.weight")  # (2 I + 2 g n + h, H)
        hidden = in_proj.shape[1]
        heads, p, g, n = _sizes(config, hidden)
        inner, bc = heads * p, g * n
        conv = take("conv1d.weight")  # (X, 1, K)
        expected = {
            "in_proj.weight": ((2 * inner + 2 * bc + heads, hidden), tuple(in_proj.shape)),
            "conv1d.weight": ((inner + 2 * bc, 1, config.d_conv), tuple(conv.shape)),
        }
        for name, (want, got) in expected.items():
            if got != want:
                raise ValueError(f"tensor {name} has shape {got}; the config's heads, groups and widths need {want}")
        z, x, b, c, dt = in_proj.split([inner, inner, bc, bc, heads])  # rows of each projection
        out = {
            "z_proj.weight": z,
            "x_proj.weight": x,
            "b_proj.weight": b,
            "c_proj.weight": c,
            "dt_proj.weight": dt,
            "dt_proj.bias": take("dt_bias"),  # (h,)
            "A_log.weight": take("A_log").reshape(heads, 1),
            "D.weight": take("D").reshape(heads, 1),
            "norm.weight": take("norm.weight").reshape(inner, 1),
            "out_proj.weight": take("out_proj.weight"),  # (H, I)
        }
        for part, weight in zip("xbc", conv[:, 0].split([inner, bc, bc]), strict=True):  # (channels, K) each
            out[f"conv_{part}.weight"] = weight
        if config.conv_bias:
            for part, bias in zip("xbc", take("conv1d.bias").split([inner, bc, bc]), strict=True):
                out[f"conv_{part}.bias"] = bias
        return {name: tensor.contiguous() for name, tensor in out.items()}

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], config: Mamba2.Config, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Hugging Face's tensors (relative to ``mixer.``) of our block's ``state``."""
        _check_type(model_type)
        projections = ("z_proj", "x_proj", "b_proj", "c_proj", "dt_proj")
        conv = torch.cat([state[f"conv_{part}.weight"] for part in "xbc"])  # (X, K)
        out = {
            "in_proj.weight": torch.cat([state[f"{name}.weight"] for name in projections]),
            "dt_bias": state["dt_proj.bias"],
            "conv1d.weight": conv[:, None, :],
            "A_log": state["A_log.weight"].reshape(-1),
            "D": state["D.weight"].reshape(-1),
            "norm.weight": state["norm.weight"].reshape(-1),
            "out_proj.weight": state["out_proj.weight"],
        }
        if config.conv_bias:
            out["conv1d.bias"] = torch.cat([state[f"conv_{part}.bias"] for part in "xbc"])
        return {name: tensor.contiguous() for name, tensor in out.items()}
