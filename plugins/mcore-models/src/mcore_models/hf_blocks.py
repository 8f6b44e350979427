"""Plugin blocks inside a Hugging Face family: finding their mappings and calling them per layer.

A family of this package maps the skeleton of a model; a layer whose MLP is another plugin's block
(``moe``) is mapped by that block's class attribute ``hf`` (``mcore.hf.HFBlockMapping``), found through
the registry's ``block_lookup`` on import and from the model's own modules on export, so this package
never imports the MoE plugin. Without it, a checkpoint with MoE layers is refused in one line naming
the plugin to install.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mcore.errors import UserError
from mcore.hf import HFBlockMapping, block_mapping
from mcore_models.gpt import GPTConfig, block_config

#: The plugin that registers each block a family may need (for the error when it is missing).
PLUGIN_OF = {"moe": "mcore-moe", "gdn": "mcore-ssm", "mamba2": "mcore-ssm"}


class HFBlocks:
    """The block classes a family asks for by name (``lookup``), for Hugging Face ``model_type``."""

    def __init__(self, lookup: Callable[[str], Any] | None, model_type: str) -> None:
        self.lookup = lookup
        self.model_type = model_type

    @classmethod
    def of_model(cls, model: torch.nn.Module, config: GPTConfig, model_type: str) -> HFBlocks:
        """The blocks ``model`` was built with, by the names its layer pattern gives them."""
        found: dict[str, Any] = {}
        for layer, (mixer, mlp) in zip(model.layers, config.layer_kinds(), strict=True):  # type: ignore[arg-type]
            found.setdefault(mixer, type(layer.attention))
            if layer.mlp is not None:
                found.setdefault(mlp, type(layer.mlp))

        def lookup(name: str) -> Any:
            if name not in found:
                raise UserError(f"the model has no {name!r} layer")
            return found[name]

        return cls(lookup, model_type)

    def block_class(self, name: str) -> Any:
        """The class registered as block ``name``; a one-line ``UserError`` naming the plugin when none is."""
        plugin = PLUGIN_OF.get(name, "the plugin that registers it")
        need = f"Hugging Face model_type {self.model_type!r} with {name!r} layers needs block {name!r} from {plugin}"
        if self.lookup is None:
            raise UserError(f"{need}: load through mcore (mcore.hf.load_hf) with {plugin} installed")
        try:
            return self.lookup(name)
        except (KeyError, ValueError) as exc:  # the registry's unknown-name error is a UserError (a ValueError)
            raise UserError(f"{need}: install it and check `mcore plugins` ({' '.join(str(exc).split())})") from None

    def mapping(self, name: str) -> HFBlockMapping:
        """Block ``name``'s Hugging Face mapping."""
        return block_mapping(self.block_class(name), name, self.model_type)

    def config(self, name: str, cfg: GPTConfig) -> Any:
        """Block ``name``'s ``Config`` in ``cfg`` (its table validated, defaults when absent)."""
        return block_config(self.block_class(name), name, cfg.blocks.get(name))


def layer_pattern(kinds: list[tuple[str, str]]) -> list[str]:
    """``[(mixer, mlp)] * n`` as a layer pattern of runs, e.g. ``['1*attention/swiglu', '3*attention/moe']``."""
    runs: list[list[Any]] = []
    for kind in kinds:
        if runs and runs[-1][1] == kind:
            runs[-1][0] += 1
        else:
            runs.append([1, kind])
    return [f"{count}*{mixer}/{mlp}" for count, (mixer, mlp) in runs]


def block_from_hf(
    hf: dict[str, torch.Tensor], src: str, dst: str, mapping: HFBlockMapping, block_cfg: Any, model_type: str
) -> dict[str, torch.Tensor]:
    """One block's tensors, popped from ``hf`` under Hugging Face prefix ``src``, under our prefix ``dst``."""
    from mcore_models.hf import take_tensor

    state = mapping.state_from_hf(lambda name: take_tensor(hf, src + name), block_cfg, model_type)
    return {dst + name: tensor for name, tensor in state.items()}


def block_to_hf(
    ours: Mapping[str, torch.Tensor], src: str, dst: str, mapping: HFBlockMapping, block_cfg: Any, model_type: str
) -> dict[str, torch.Tensor]:
    """One block's Hugging Face tensors under ``dst`` from our ``ours`` (a state dict) under ``src``."""
    state = {name[len(src) :]: tensor for name, tensor in ours.items() if name.startswith(src)}
    return {dst + name: tensor for name, tensor in mapping.state_to_hf(state, block_cfg, model_type).items()}
