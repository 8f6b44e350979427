"""Plugin discovery and the registry's user-facing errors."""

from __future__ import annotations

import sys
import types

import pytest
from fakedist import make_distribution, plugin_source

from mcore import __version__, plugins
from mcore.errors import DuplicateNameError, PluginLoadError, PluginWarning, UnknownNameError, UserError
from mcore.plugins import load_plugins
from mcore.plugins.registry import Registry, Source
from mcore_testing.hosts import isolated_host


def test_builtins_registered_lazily():
    host = isolated_host()
    assert host.registry.names("precision") == ["bf16", "fp32"]
    impl = host.get("layout", "single")
    assert impl.ref == "mcore.layouts.single:SingleLayout" and impl._loaded is None
    assert impl.load().name == "single"


def test_unknown_name_lists_available_with_distribution_and_nearest():
    host = isolated_host()
    with pytest.raises(UnknownNameError) as err:
        host.get("precision", "bf61")
    message = str(err.value)
    assert message == (
        "unknown precision 'bf61' (did you mean 'bf16'?); available precision implementations: "
        f"bf16 (mcore-core {__version__}), fp32 (mcore-core {__version__})"
    )


def test_unknown_name_of_empty_kind_says_nothing_installed():
    with pytest.raises(UnknownNameError, match=r"unknown dispatcher 'alltoall': no MoE token dispatcher .* installed"):
        isolated_host().get("dispatcher", "alltoall")


def test_unknown_kind_is_rejected_with_allowed_kinds():
    registry = Registry()
    with pytest.raises(UserError, match=r"unknown implementation kind 'layuot'.*did you mean 'layout'"):
        registry.add("layuot", "x", "a.b:c", source=Source("d", "1", "p"))


def test_entry_point_plugin_is_discovered_with_its_distribution(site):
    make_distribution(
        site, "acme-mcore", "2.3.0", "fake_acme", plugin_source('"precision", "acme-fp6", "fake_acme:Recipe"')
    )
    host = load_plugins(unpackaged=False, env=False)
    impl = host.get("precision", "acme-fp6")
    assert (impl.source.distribution, impl.source.version) == ("acme-mcore", "2.3.0")
    assert "fake_acme" in sys.modules and host.get("layout", "single")


def test_plugin_that_fails_to_import_warns_once_and_others_still_load(site):
    make_distribution(site, "broken-mcore", "0.4.1", "fake_broken", "import does_not_exist_anywhere\n")
    make_distribution(site, "good-mcore", "1.0.0", "fake_good", plugin_source('"layout", "zigzag", "fake_good:Z"'))
    with pytest.warns(PluginWarning) as record:
        host = load_plugins(unpackaged=False, env=False)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert messages[0] == (
        "mcore plugin 'fake_broken' from broken-mcore 0.4.1 failed to import: "
        "ModuleNotFoundError: No module named 'does_not_exist_anywhere'"
    )
    assert host.get("layout", "zigzag").source.distribution == "good-mcore"
    assert [p.source.distribution for p in host.problems] == ["broken-mcore"]


def test_strict_mode_raises_on_broken_plugin(site, monkeypatch):
    make_distribution(site, "broken-mcore", "0.4.1", "fake_broken2", "raise RuntimeError('bad init')\n")
    monkeypatch.setenv("MCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="broken-mcore 0.4.1 failed to import: RuntimeError: bad init"):
        load_plugins(unpackaged=False, env=False)


def test_plugin_for_other_api_version_is_skipped_with_versions_that_fit(site):
    make_distribution(
        site, "future-mcore", "9.0.0", "fake_future", plugin_source('"layout", "warp", "fake_future:W"', api=7)
    )
    with pytest.warns(PluginWarning) as record:
        host = load_plugins(unpackaged=False, env=False)
    assert str(record[0].message) == (
        f"mcore plugin 'fake_future' from future-mcore 9.0.0 is built for mcore plugin API 7, but mcore-core {__version__} "
        "supports API 1; install a release of future-mcore built for API 1, or an mcore-core that supports API 7"
    )
    assert ("layout", "warp") not in host.registry


def test_plugin_without_api_declaration_is_skipped(site):
    make_distribution(site, "old-mcore", "0.1.0", "fake_old", "x = 1\n")
    with pytest.warns(PluginWarning, match="does not declare MCORE_PLUGIN_API.*add `MCORE_PLUGIN_API = 1`"):
        load_plugins(unpackaged=False, env=False)


def test_plugin_whose_register_hook_raises_is_rolled_back(site):
    source = (
        "from mcore.plugins import hookimpl\n"
        "MCORE_PLUGIN_API = 1\n"
        "@hookimpl\n"
        "def mcore_register(registry):\n"
        "    registry.add('layout', 'half', 'fake_half:H')\n"
        "    raise RuntimeError('oops')\n"
    )
    make_distribution(site, "half-mcore", "1.0", "fake_half", source)
    with pytest.warns(PluginWarning, match=r"half-mcore 1.0 failed to register: RuntimeError: oops"):
        host = load_plugins(unpackaged=False, env=False)
    assert ("layout", "half") not in host.registry


def test_duplicate_name_from_two_distributions_names_both(site):
    make_distribution(site, "alpha-mcore", "1.0", "fake_alpha", plugin_source('"layout", "ringx", "fake_alpha:F"'))
    make_distribution(site, "beta-mcore", "2.0", "fake_beta", plugin_source('"layout", "ringx", "fake_beta:F"'))
    host = load_plugins(unpackaged=False, env=False)
    with pytest.raises(DuplicateNameError) as err:
        host.get("layout", "ringx")
    assert str(err.value) == (
        "layout 'ringx' is registered by two distributions: alpha-mcore 1.0 (fake_alpha:F) and beta-mcore 2.0 "
        "(fake_beta:F). Uninstall one, or choose with MCORE_PREFER='layout:ringx=alpha-mcore'"
    )


def test_mcore_prefer_resolves_a_duplicate(site, monkeypatch):
    make_distribution(site, "alpha-mcore", "1.0", "fake_alpha2", plugin_source('"layout", "ringx", "fake_alpha2:F"'))
    make_distribution(site, "beta-mcore", "2.0", "fake_beta2", plugin_source('"layout", "ringx", "fake_beta2:F"'))
    monkeypatch.setenv("MCORE_PREFER", "layout:ringx=beta-mcore")
    host = load_plugins(unpackaged=False, env=False)
    assert host.get("layout", "ringx").source.distribution == "beta-mcore"


def test_malformed_prefer_is_a_user_error():
    with pytest.raises(UserError, match="MCORE_PREFER entry 'fsdp' is malformed"):
        Registry("fsdp")


def test_mcore_plugins_env_module(site, monkeypatch):
    (site / "fake_envplug.py").write_text(plugin_source('"optimizer", "lion", "fake_envplug:Lion"'))
    monkeypatch.setenv("MCORE_PLUGINS", "fake_envplug, fake_missing_mod")
    with pytest.warns(PluginWarning, match="'fake_missing_mod' from MCORE_PLUGINS failed to import"):
        host = load_plugins(entry_points=False, unpackaged=False)
    impl = host.get("optimizer", "lion")
    assert impl.source.plugin == "fake_envplug"


def test_register_object_for_unpackaged_plugin():
    class Plugin:
        MCORE_PLUGIN_API = 1

        @plugins.hookimpl
        def mcore_register(self, registry):
            registry.add("lr_schedule", "triangle", "math:sin")

    obj = Plugin()
    plugins.register(obj)
    try:
        host = load_plugins(entry_points=False, env=False)
        assert host.get("lr_schedule", "triangle").source.distribution == "<unpackaged>"
    finally:
        plugins.unregister(obj)
    assert ("lr_schedule", "triangle") not in load_plugins(entry_points=False, env=False).registry


def test_hook_with_wrong_signature_is_skipped():
    module = types.ModuleType("fake_badsig")
    module.MCORE_PLUGIN_API = 1

    @plugins.hookimpl
    def mcore_register(registry, unexpected):  # not in the hookspec
        pass

    module.mcore_register = mcore_register
    with pytest.warns(PluginWarning, match="'fake_badsig' from .* is invalid"):
        load_plugins(entry_points=False, env=False, unpackaged=False, extra=[module])


def test_unknown_hook_is_rejected():
    module = types.ModuleType("fake_typo")
    module.MCORE_PLUGIN_API = 1

    @plugins.hookimpl
    def mcore_registr(registry):
        pass

    module.mcore_registr = mcore_registr
    with pytest.warns(PluginWarning, match="unknown hook 'mcore_registr'"):
        load_plugins(entry_points=False, env=False, unpackaged=False, extra=[module])


def test_cli_command_hook_and_lifecycle_hooks():
    calls = []

    class Plugin:
        MCORE_PLUGIN_API = 1

        @plugins.hookimpl
        def mcore_cli_commands(self, add):
            add("hello", "fake_mod:main", help="say hello")

        @plugins.hookimpl
        def mcore_step_end(self, step, metrics):
            calls.append((step, metrics["loss"]))

    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=[Plugin()])
    assert host.commands["hello"].ref == "fake_mod:main"
    host.hook.mcore_step_end(step=3, metrics={"loss": 1.5})
    assert calls == [(3, 1.5)]
