"""The ``gdn`` block's part of a Hugging Face checkpoint: ``GatedDeltaNet.hf``, an ``mcore.hf.HFBlockMapping``.

Shape legend: H hidden size, hk query/key heads, hv value heads, r = hv / hk, dk key dim, dv value dim, K conv
width, C = 2 hk dk + hv dv conv channels.

A model plugin's family (``qwen3_next``) maps the skeleton and hands this mapping a linear-attention layer's
module (``model.layers.i.linear_attn.``); this module maps ``[model.gdn]`` <-> the ``linear_*`` keys of
``config.json`` and our tensors <-> ``Qwen3NextGatedDeltaNet``'s. Hugging Face fuses the projections per
query/key head ``g``: ``in_proj_qkvz`` rows ``[q_g (dk) | k_g (dk) | v_g (r dv) | z_g (r dv)]`` and ``in_proj_ba``
rows ``[b_g (r) | a_g (r)]``; ours are one linear each (``q``, ``k``, ``v``, ``z``, ``b``, ``a``, heads in order), so
import regroups those rows and export interleaves them back (a permutation of rows: the values are copied,
never changed). ``conv1d.weight (C, 1, K)`` over ``[q | k | v]`` is ``conv_q``/``conv_k``/``conv_v``; ``dt_bias``
is ``a.bias``; ``A_log (hv,)`` is ``A_log.weight (hv, 1)``; ``norm.weight`` (ones-centred) is ``norm_weight``;
``out_proj`` is ``out``. The gated norm's epsilon is ``rms_norm_eps`` (shared with the model's norms: the family
checks they agree). ``chunk_size`` and ``kernel`` are how we compute, not what: not written, defaults on import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # gdn.py imports this module for ``GatedDeltaNet.hf``
    from mcore_ssm.gdn import GatedDeltaNet

#: Model types this mapping reads and writes.
MODEL_TYPES = ("qwen3_next",)


def _check_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type = {model_type!r}: the gdn block maps {', '.join(MODEL_TYPES)}")


def _sizes(config: GatedDeltaNet.Config, hidden: int) -> tuple[int, int, int, int]:
    """``(hk, hv, dk, dv)`` of ``config`` in a model of hidden size ``hidden`` (the block's own defaults)."""
    hk = config.num_qk_heads
    hv = config.num_v_heads or hk
    dk = config.head_k_dim or hidden // hv
    return hk, hv, dk, config.head_v_dim or dk


class GatedDeltaNetHF:
    """``mcore.hf.HFBlockMapping`` of the ``gdn`` block for ``qwen3_next`` (``linear_attn``)."""

    # -- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], model_type: str) -> GatedDeltaNet.Config:
        """``[model.gdn]`` of ``config.json``; ``ValueError`` naming a key whose value does not map."""
        from mcore_ssm.gdn import GatedDeltaNet

        _check_type(model_type)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}: allowed: silu (the conv's activation)")
        hk, hv = hf.get("linear_num_key_heads", 16), hf.get("linear_num_value_heads", 32)
        if not (isinstance(hk, int) and isinstance(hv, int) and hk > 0 and hv % hk == 0):
            raise ValueError(
                f"config.json linear_num_value_heads = {hv!r}: allowed: a multiple of linear_num_key_heads = {hk!r}"
            )
        return GatedDeltaNet.Config(
            num_qk_heads=hk,
            num_v_heads=hv,
            head_k_dim=hf.get("linear_key_head_dim", 128),
            head_v_dim=hf.get("linear_value_head_dim", 128),
            conv_kernel=hf.get("linear_conv_kernel_dim", 4),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
        )

    def config_to_hf(self, config: GatedDeltaNet.Config, model_type: str) -> dict[str, Any]:
        """The ``linear_*`` keys of ``config.json`` (and the norm's ``rms_norm_eps``); ``ValueError`` listing every
        setting the model type cannot express (``head_k_dim`` must be set: the mapping does not see the hidden size)."""
        _check_type(model_type)
        problems = []
        if config.out_bias:
            problems.append("gdn.out_bias = true (needs false)")
        if config.head_k_dim is None:
            problems.append("gdn.head_k_dim = None (needs it set: it is linear_key_head_dim)")
        if problems:
            raise ValueError(f"model cannot be exported as Hugging Face {model_type!r}: " + "; ".join(problems))
        hk, hv, dk, dv = _sizes(config, 0)
        return {
            "linear_num_key_heads": hk,
            "linear_num_value_heads": hv,
            "linear_key_head_dim": dk,
            "linear_value_head_dim": dv,
            "linear_conv_kernel_dim": config.conv_kernel,
            "rms_norm_eps": config.norm_eps,
        }

    # -- weights ---------------------------------------------------------------------------------
    def state_from_hf(
        self, take: Callable[[str], torch.Tensor], config: GatedDeltaNet.Config, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Our tensors (relative to the block) read through ``take`` (names relative to ``linear_attn.``)."""
        _check_type(model_type)
        qkvz, ba = take("in_proj_qkvz.weight"), take("in_proj_ba.weight")  # (hk (2dk + 2r dv), H), (2 hv, H)
        hidden = qkvz.shape[1]
        hk, hv, dk, dv = _sizes(config, hidden)
        r = hv // hk
        expected = {"in_proj_qkvz.weight": (hk * (2 * dk + 2 * r * dv), hidden), "in_proj_ba.weight": (2 * hv, hidden)}
        for name, tensor in (("in_proj_qkvz.weight", qkvz), ("in_proj_ba.weight", ba)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}; the config's heads need {expected[name]}"
                )
        q, k, v, z = qkvz.view(hk, -1, hidden).split([dk, dk, r * dv, r * dv], dim=1)  # (hk, rows, H) each
        b, a = ba.view(hk, 2 * r, hidden).split([r, r], dim=1)  # (hk, r, H) each
        conv = take("conv1d.weight")  # (C, 1, K)
        conv_q, conv_k, conv_v = conv[:, 0].split([hk * dk, hk * dk, hv * dv])  # (channels, K) each
        out = {
            "q.weight": q.reshape(hk * dk, hidden),
            "k.weight": k.reshape(hk * dk, hidden),
            "v.weight": v.reshape(hv * dv, hidden),  # value head g * r + i: group g's i-th
            "z.weight": z.reshape(hv * dv, hidden),
            "b.weight": b.reshape(hv, hidden),
            "a.weight": a.reshape(hv, hidden),
            "a.bias": take("dt_bias"),  # (hv,)
            "conv_q.weight": conv_q,
            "conv_k.weight": conv_k,
            "conv_v.weight": conv_v,
            "A_log.weight": take("A_log").reshape(hv, 1),
            "norm_weight": take("norm.weight"),  # (dv,)
            "out.weight": take("out_proj.weight"),  # (H, hv dv)
        }
        return {name: tensor.contiguous() for name, tensor in out.items()}

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], config: GatedDeltaNet.Config, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Hugging Face's tensors (relative to ``linear_attn.``) of our block's ``state``."""
        _check_type(model_type)
        hidden = state["q.weight"].shape[1]
        hk, hv, dk, dv = _sizes(config, hidden)
        r = hv // hk

        def grouped(name: str, rows: int) -> torch.Tensor:
            return state[name].reshape(hk, rows, hidden)  # (hk, rows per group, H)

        qkvz = torch.cat([grouped("q.weight", dk), grouped("k.weight", dk), grouped("v.weight", r * dv)], dim=1)
        qkvz = torch.cat([qkvz, grouped("z.weight", r * dv)], dim=1).reshape(-1, hidden)
        ba = torch.cat([grouped("b.weight", r), grouped("a.weight", r)], dim=1).reshape(-1, hidden)
        conv = torch.cat([state["conv_q.weight"], state["conv_k.weight"], state["conv_v.weight"]])  # (C, K)
        out = {
            "in_proj_qkvz.weight": qkvz,
            "in_proj_ba.weight": ba,
            "conv1d.weight": conv[:, None, :],
            "dt_bias": state["a.bias"],
            "A_log": state["A_log.weight"].reshape(hv),
            "norm.weight": state["norm_weight"],
            "out_proj.weight": state["out.weight"],
        }
        return {name: tensor.contiguous() for name, tensor in out.items()}
