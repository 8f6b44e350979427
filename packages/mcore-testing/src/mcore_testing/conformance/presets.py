"""Conformance of registered presets: each resolves as a run config and builds on the meta device.

A plugin that brings blocks registers the presets that use them (kind ``"preset"``); its tests
subclass ``PresetConformance`` with ``plugins`` (the plugin modules a host needs, e.g. its own and
the model's) and ``distribution`` (its own, so only its presets are checked)::

    class TestMyPresets(PresetConformance):
        plugins = ("mcore_models.plugin", "my_moe.plugin")
        distribution = "my-moe"

Each preset's ``[model]`` section (``preset = NAME`` alone) must resolve through the core
(``mcore.config.resolve_model``: block tables validated, ``check_blocks`` run), name an installed
model, and build on the meta device (no memory) with every parameter declaring ``init`` when the
factory says ``supports_meta_init``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from mcore.config import resolve_model
from mcore.params import collect_param_specs
from mcore_testing.hosts import isolated_host


class PresetConformance:
    plugins: ClassVar[tuple[str, ...]] = ()
    distribution: ClassVar[str] = ""

    def host(self) -> Any:
        return isolated_host(*self.plugins)

    def preset_names(self) -> list[str]:
        host = self.host()
        names = [impl.name for impl in host.registry if impl.kind == "preset"]
        return [
            n for n in names if not self.distribution or host.get("preset", n).source.distribution == self.distribution
        ]

    def test_the_plugin_registers_presets(self) -> None:
        assert self.preset_names(), f"no presets registered by {self.distribution or 'these plugins'}"

    def test_every_preset_resolves_and_builds_on_meta(self) -> None:
        host = self.host()
        for name in self.preset_names():
            selection = resolve_model({"preset": name}, host)
            factory = selection.implementation.load()
            if getattr(factory, "supports_meta_init", False) is not True:
                continue
            model = factory.build(
                selection.config, seed=0, device="meta", block_lookup=lambda block: host.load("block", block)
            )
            params = dict(model.named_parameters())
            assert params and all(p.is_meta for p in params.values()), f"preset {name!r}: not built on meta"
            undeclared = [n for n, spec in collect_param_specs(model).items() if spec.init is None]
            assert not undeclared, f"preset {name!r}: parameters without a declared init: {undeclared[:3]}"

    def test_an_unknown_preset_is_one_line(self) -> None:
        from mcore.errors import ConfigError

        with pytest.raises(ConfigError) as info:
            resolve_model({"preset": "no-such-preset-xyz"}, self.host())
        assert "\n" not in str(info.value) and "unknown preset" in str(info.value)


__all__ = ["PresetConformance"]
