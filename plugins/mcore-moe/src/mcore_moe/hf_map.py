"""The ``moe`` block's part of a Hugging Face checkpoint: ``MoE.hf``, an ``mcore.hf.HFBlockMapping``.

Shape legend: E routed experts, F expert FFN size, H hidden size, F_s shared FFN size.

A model plugin's family (``deepseek_v3``, ``qwen3_moe``, ``mixtral``, ``qwen3_next``) maps the skeleton and hands this
mapping the MoE layer's module (``model.layers.i.mlp.``, Mixtral's ``block_sparse_moe.``); this module
maps ``[model.moe]`` <-> the MoE keys of ``config.json`` and the router, the experts and the shared
experts <-> their tensors. Hugging Face stores expert ``i`` as its own matrices
(``experts.{i}.gate_proj.weight`` ``(F, H)``, Mixtral's ``w1``/``w3``/``w2``); ours are stacked
``(E, F, H)`` / ``(E, H, F)``: stacked on import, unbound (copied) on export, never changed otherwise.

Routing, per model type, exactly as ``transformers`` computes it:

* ``deepseek_v3``: sigmoid scores, the choice by ``s + e_score_correction_bias`` (our ``expert_bias``,
  always on after import), group-limited (``n_group``, ``topk_group``; a group scored by its top-2),
  ``norm_topk_prob``, ``routed_scaling_factor``; ``n_shared_experts`` shared experts of
  ``moe_intermediate_size`` each (one dense SwiGLU of ``F_s = n * F``).
* ``qwen3_moe``: softmax over all experts, top-k, renormalised when ``norm_topk_prob``; no shared experts.
* ``mixtral``: the same, always renormalised; the experts' FFN size is ``intermediate_size``.
* ``qwen3_next``: routed as ``qwen3_moe``, plus one shared expert of ``shared_expert_intermediate_size``
  (``shared_expert.*``) scaled per token by ``sigmoid(shared_expert_gate(x))`` (our ``shared_expert_gate``,
  ``shared_gate.weight``).

Hugging Face renormalises one chosen weight to 1 where our router (like Megatron's) keeps ``s`` at
``top_k = 1``: softmax routers then use ``softmax_after_topk`` (also exactly 1); DeepSeek's is refused.
Hugging Face MoE is dropless: a ``capacity_factor`` is refused on export. Training-only settings are
carried where they mean the same: DeepSeek's ``aux_loss_alpha`` (``seq_aux``: per sequence) as
``seq_aux_loss_coeff`` (or ``aux_loss_coeff``), ``router_aux_loss_coef`` as ``aux_loss_coeff``; the z-loss,
the bias update rate, the dispatcher and ``chunk_tokens`` have no Hugging Face key and are not written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # block.py imports this module for ``MoE.hf``
    from mcore_moe.block import MoEConfig

#: Model types this mapping reads and writes.
MODEL_TYPES = ("deepseek_v3", "qwen3_moe", "mixtral", "qwen3_next")
#: Hugging Face's names of each expert's gate, up and down matrices.
_EXPERT_NAMES = {
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
    "qwen3_next": ("gate_proj", "up_proj", "down_proj"),
}
#: Where each model type keeps its shared experts (relative to the MoE module).
_SHARED_MODULE = {"deepseek_v3": "shared_experts", "qwen3_next": "shared_expert"}
_SHARED = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


def _check_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type = {model_type!r}: the moe block maps {', '.join(MODEL_TYPES)}")


def _refuse(model_type: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {model_type!r}: " + "; ".join(problems))


def _sums_to_one(c: MoEConfig) -> bool:
    """Each token's combine weights sum to 1 (before ``routed_scaling_factor``)."""
    return c.softmax_after_topk or (c.normalize and c.top_k > 1)


def _aux_from_hf(hf: Mapping[str, Any], model_type: str) -> tuple[float, float]:
    """``(aux_loss_coeff, seq_aux_loss_coeff)`` of ``config.json``."""
    if model_type == "deepseek_v3":
        alpha = float(hf.get("aux_loss_alpha", 0.0) or 0.0)
        return (0.0, alpha) if hf.get("seq_aux", True) else (alpha, 0.0)
    return float(hf.get("router_aux_loss_coef", 0.0) or 0.0), 0.0


class MoEHF:
    """``mcore.hf.HFBlockMapping`` of the ``moe`` block for ``deepseek_v3``, ``qwen3_moe``, ``mixtral`` and
    ``qwen3_next``."""

    # -- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], model_type: str) -> MoEConfig:
        """``[model.moe]`` of ``config.json``; ``ValueError`` naming a key whose value does not map."""
        from mcore_moe.block import MoEConfig

        _check_type(model_type)
        top_k = hf["num_experts_per_tok"]
        aux, seq_aux = _aux_from_hf(hf, model_type)
        if model_type == "deepseek_v3":
            for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
                if hf.get(key, allowed) != allowed:
                    raise ValueError(f"config.json {key} = {hf[key]!r}: allowed: {allowed!r}")
            experts, groups = hf["n_routed_experts"], hf.get("n_group", 1) or 1
            norm = bool(hf.get("norm_topk_prob", True))
            if norm and top_k == 1:
                raise ValueError(
                    "config.json num_experts_per_tok = 1 with norm_topk_prob = true: not supported "
                    "(the router keeps the sigmoid score of a single expert)"
                )
            if groups > 1 and experts // groups < 2:
                raise ValueError(f"config.json n_group = {groups}: needs at least 2 experts per group")
            return MoEConfig(
                num_experts=experts,
                top_k=top_k,
                score_function="sigmoid",
                normalize=norm,
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                num_groups=groups,
                topk_groups=(hf.get("topk_group", 1) or 1) if groups > 1 else 1,
                expert_bias=True,
                moe_ffn_hidden_size=hf["moe_intermediate_size"],
                num_shared_experts=hf.get("n_shared_experts", 0) or 0,
                aux_loss_coeff=aux,
                seq_aux_loss_coeff=seq_aux,
            )
        if model_type == "mixtral":
            if hf.get("router_jitter_noise", 0.0):
                raise ValueError(f"config.json router_jitter_noise = {hf['router_jitter_noise']}: allowed: 0.0")
            experts, norm, ffn = hf["num_local_experts"], True, hf["intermediate_size"]
        else:
            experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
            norm, ffn = bool(hf.get("norm_topk_prob", False)), hf["moe_intermediate_size"]
        shared: dict[str, Any] = {}
        if model_type == "qwen3_next":  # one gated shared expert, always present
            size = hf.get("shared_expert_intermediate_size", 512)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"config.json shared_expert_intermediate_size = {size!r}: allowed: an int >= 1")
            shared = dict(num_shared_experts=1, shared_ffn_hidden_size=size, shared_expert_gate=True)
        return MoEConfig(
            num_experts=experts,
            top_k=top_k,
            score_function="softmax",
            softmax_after_topk=norm and top_k == 1,  # Hugging Face's renormalised single weight: 1
            normalize=norm,
            moe_ffn_hidden_size=ffn,
            aux_loss_coeff=aux,
            seq_aux_loss_coeff=seq_aux,
            **shared,
        )

    def config_to_hf(self, config: MoEConfig, model_type: str) -> dict[str, Any]:
        """The MoE keys of ``config.json``; ``ValueError`` listing every setting the model type cannot express."""
        _check_type(model_type)
        c = config
        problems = []
        if c.router != "topk":
            problems.append(f"moe.router = {c.router!r} (needs 'topk')")
        if c.capacity_factor is not None:
            problems.append(f"moe.capacity_factor = {c.capacity_factor} (Hugging Face MoE is dropless: needs none)")
        if c.swiglu_limit is not None:
            problems.append(f"moe.swiglu_limit = {c.swiglu_limit} ({model_type} experts are plain SwiGLU: needs none)")
        if model_type == "deepseek_v3":
            if c.score_function != "sigmoid":
                problems.append(f"moe.score_function = {c.score_function!r} (deepseek_v3 needs 'sigmoid')")
            if c.shared_ffn_hidden_size not in (None, c.moe_ffn_hidden_size):
                problems.append(
                    f"moe.shared_ffn_hidden_size = {c.shared_ffn_hidden_size} (deepseek_v3 needs none or "
                    f"moe_ffn_hidden_size = {c.moe_ffn_hidden_size})"
                )
            if c.num_groups > 1 and c.num_experts // c.num_groups < 2:
                problems.append(f"moe.num_groups = {c.num_groups} (deepseek_v3 needs at least 2 experts per group)")
            if c.shared_expert_gate:
                problems.append("moe.shared_expert_gate = true (deepseek_v3 has no shared-expert gate)")
            _refuse(model_type, problems)
            return {
                "n_routed_experts": c.num_experts,
                "num_experts_per_tok": c.top_k,
                "moe_intermediate_size": c.moe_ffn_hidden_size,
                "n_shared_experts": c.num_shared_experts,
                "n_group": c.num_groups,
                "topk_group": c.topk_groups if c.num_groups > 1 else 1,
                "routed_scaling_factor": c.routed_scaling_factor,
                "norm_topk_prob": c.normalize and c.top_k > 1,
                "scoring_func": "sigmoid",
                "topk_method": "noaux_tc",
                "aux_loss_alpha": c.seq_aux_loss_coeff or c.aux_loss_coeff,
                "seq_aux": bool(c.seq_aux_loss_coeff) or not c.aux_loss_coeff,
            }
        if c.score_function != "softmax":
            problems.append(f"moe.score_function = {c.score_function!r} ({model_type} needs 'softmax')")
        if c.expert_bias:
            problems.append(f"moe.expert_bias = true ({model_type} has no expert bias)")
        if c.num_groups != 1:
            problems.append(f"moe.num_groups = {c.num_groups} ({model_type} needs 1)")
        if c.routed_scaling_factor != 1.0:
            problems.append(f"moe.routed_scaling_factor = {c.routed_scaling_factor} ({model_type} needs 1.0)")
        if model_type == "qwen3_next":
            if c.num_shared_experts != 1:
                problems.append(f"moe.num_shared_experts = {c.num_shared_experts} (qwen3_next has exactly 1)")
            if not c.shared_expert_gate:
                problems.append("moe.shared_expert_gate = false (qwen3_next gates its shared expert: needs true)")
        elif c.num_shared_experts:
            problems.append(f"moe.num_shared_experts = {c.num_shared_experts} ({model_type} has none)")
        if model_type == "mixtral" and not _sums_to_one(c):
            problems.append(
                f"moe.normalize = {c.normalize} with top_k = {c.top_k} (mixtral renormalises the top-k weights: "
                "needs normalize = true, or softmax_after_topk = true)"
            )
        _refuse(model_type, problems)
        out: dict[str, Any] = {"num_experts_per_tok": c.top_k, "router_aux_loss_coef": c.aux_loss_coeff}
        if model_type == "mixtral":
            return out | {"num_local_experts": c.num_experts, "intermediate_size": c.moe_ffn_hidden_size}
        if model_type == "qwen3_next":
            out["shared_expert_intermediate_size"] = c.shared_ffn_hidden_size or c.moe_ffn_hidden_size
        return out | {
            "num_experts": c.num_experts,
            "moe_intermediate_size": c.moe_ffn_hidden_size,
            "norm_topk_prob": _sums_to_one(c),
        }

    # -- weights ---------------------------------------------------------------------------------
    def state_from_hf(
        self, take: Callable[[str], torch.Tensor], config: MoEConfig, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Our tensors (relative to the block) read through ``take`` (names relative to the MoE module)."""
        _check_type(model_type)
        c = config
        router = take("gate.weight")  # (E, H)
        out = {"router.weight": router}
        if model_type == "deepseek_v3":
            out["router.expert_bias"] = take("gate.e_score_correction_bias").float()  # (E,)
        else:
            out["router.expert_bias"] = torch.zeros(c.num_experts, dtype=torch.float32, device=router.device)
        for ours, theirs in zip(("gate", "up", "down"), _EXPERT_NAMES[model_type], strict=True):
            per_expert = [take(f"experts.{e}.{theirs}.weight") for e in range(c.num_experts)]
            out[f"experts.{ours}"] = torch.stack(per_expert)  # (E, F, H) or (E, H, F)
        if model_type in _SHARED_MODULE:
            module = _SHARED_MODULE[model_type]
            shared = {ours: take(f"{module}.{theirs}.weight") for ours, theirs in _SHARED}
            if c.num_shared_experts:  # n_shared_experts = 0: Hugging Face keeps empty (0, H) matrices
                out |= {f"shared_experts.{ours}.weight": w for ours, w in shared.items()}
        if model_type == "qwen3_next":
            out["shared_gate.weight"] = take("shared_expert_gate.weight")  # (1, H)
        return out

    def state_to_hf(
        self, state: Mapping[str, torch.Tensor], config: MoEConfig, model_type: str
    ) -> dict[str, torch.Tensor]:
        """Hugging Face's tensors (relative to the MoE module) of our block's ``state``; each expert a copy."""
        _check_type(model_type)
        c = config
        out = {"gate.weight": state["router.weight"]}
        if model_type == "deepseek_v3":
            out["gate.e_score_correction_bias"] = state["router.expert_bias"].float()
        for ours, theirs in zip(("gate", "up", "down"), _EXPERT_NAMES[model_type], strict=True):
            stacked = state[f"experts.{ours}"]  # (E, F, H) or (E, H, F)
            out |= {f"experts.{e}.{theirs}.weight": stacked[e].clone() for e in range(c.num_experts)}
        if model_type in _SHARED_MODULE:
            module = _SHARED_MODULE[model_type]
            for ours, theirs in _SHARED:
                key = f"shared_experts.{ours}.weight"
                if key in state:
                    out[f"{module}.{theirs}.weight"] = state[key]
                else:  # no shared experts: Hugging Face's zero-width MLP
                    rows, cols = (0, _hidden_size(state)) if ours != "down" else (_hidden_size(state), 0)
                    out[f"{module}.{theirs}.weight"] = state["router.weight"].new_empty(rows, cols)
        if model_type == "qwen3_next":
            out["shared_expert_gate.weight"] = state["shared_gate.weight"]
        return out


def _hidden_size(state: Mapping[str, torch.Tensor]) -> int:
    """H: the hidden size of a block's ``state`` (the router's columns)."""
    return int(state["router.weight"].shape[1])
