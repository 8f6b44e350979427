"""Presets: named starting points for a model's ``[model]`` section, registered as their own kind.

A preset belongs to the plugin that brings what it uses: ``mcore-models`` registers ``tiny`` and
``llama3-8b`` for ``gpt``, a MoE plugin registers the presets whose layers are MoE, and each
plugin's tests can run its own. A plugin registers one under kind ``"preset"``::

    registry.add("preset", "llama3-8b", "my_plugin.presets:LLAMA3_8B", summary="Llama 3 8B shapes")

where ``LLAMA3_8B = Preset(model="gpt", values={"hidden_size": 4096, "attention": {"num_heads": 32}})``.
``values`` are ``[model]`` keys; a table among them is a block section (``[model.attention]``).

Resolving ``model.preset = NAME`` (``resolve_preset``): the preset's values are merged under the
user's (a key the user gives wins; a block section is merged key by key), and ``model.name``
defaults to the preset's model. A preset of another model is refused, naming both.
A model factory may still answer ``presets()`` itself (the older protocol); registered presets win.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Preset", "deep_merge", "frozen_values"]


def frozen_values(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of nested ``values`` (tables become read-only mappings)."""
    return MappingProxyType({k: frozen_values(v) if isinstance(v, Mapping) else v for k, v in values.items()})


def plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable deep copy of nested ``values`` (read-only mappings become dicts)."""
    return {k: plain_values(v) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in values.items()}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` over it: tables merged key by key, anything else replaced (new dicts)."""
    out = plain_values(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = plain_values(value) if isinstance(value, Mapping) else value
    return out


@dataclass(frozen=True)
class Preset:
    """A named config of model ``model``: ``values`` are ``[model]`` keys, tables are block sections."""

    model: str
    values: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"Preset.model = {self.model!r}: must name the model it configures (e.g. 'gpt')")
        if not isinstance(self.values, Mapping):
            raise ValueError(f"Preset.values = {self.values!r}: must be a mapping of [model] keys")
        if "name" in self.values or "preset" in self.values:
            raise ValueError(
                "Preset.values may not set 'name' or 'preset' (the preset names its model in Preset.model)"
            )
        object.__setattr__(self, "values", frozen_values(self.values))
