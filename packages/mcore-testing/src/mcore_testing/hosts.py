"""Plugin hosts for tests: only the plugins a test names, never the installed ones."""

from __future__ import annotations

from typing import Any

from mcore.plugins import PluginHost, load_plugins


def isolated_host(*plugins: Any, builtins: bool = True, strict: bool = True) -> PluginHost:
    """A host holding the core's built-ins (unless ``builtins=False``) and ``plugins``.

    ``plugins`` are modules, objects with hooks, or module names (``"mcore_testing.plugin"``).
    """
    extra = (["mcore.builtin"] if builtins else []) + list(plugins)
    return load_plugins(entry_points=False, env=False, unpackaged=False, extra=extra, strict=strict)
