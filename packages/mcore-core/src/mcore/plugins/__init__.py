"""Plugin discovery and the host that holds what plugins registered.

Plugins come from three places, loaded in this order:

1. entry points in group ``mcore`` of installed distributions (one at a time, so a broken
   plugin is skipped with a warning naming it and its version; the rest still load);
2. modules named in the ``MCORE_PLUGINS`` environment variable (comma-separated);
3. objects passed to ``mcore.plugins.register(obj)`` in this process.

Each plugin declares ``MCORE_PLUGIN_API``; one built for an API this core does not support
is skipped with a message saying which versions fit. ``MCORE_STRICT_PLUGINS=1`` turns every
skip into an exception (for CI). ``load_plugins`` returns a ``PluginHost``; nothing is
cached at module level, so tests build the host they need.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from mcore.__about__ import PLUGIN_API_VERSION, SUPPORTED_PLUGIN_APIS, __version__
from mcore.errors import PluginLoadError, PluginWarning, UserError
from mcore.plugins import hookspecs
from mcore.plugins.hookspecs import hookimpl
from mcore.plugins.registry import KINDS, Implementation, Registry, ScopedRegistrar, Source, resolve_ref

__all__ = [
    "KINDS",
    "CliCommand",
    "Implementation",
    "PluginHost",
    "Registry",
    "Source",
    "hookimpl",
    "load_plugins",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "mcore"

#: Objects added with ``register(obj)``; the one process-wide list, read by ``load_plugins``.
_UNPACKAGED: list[Any] = []


def register(obj: Any) -> None:
    """Make an unpackaged plugin (module or object with hooks) visible to later ``load_plugins``."""
    if obj not in _UNPACKAGED:
        _UNPACKAGED.append(obj)


def unregister(obj: Any) -> None:
    """Undo ``register(obj)``."""
    if obj in _UNPACKAGED:
        _UNPACKAGED.remove(obj)


@dataclass(frozen=True)
class CliCommand:
    """A subcommand contributed by a plugin; ``ref`` is ``"module:function"``."""

    name: str
    ref: str
    help: str
    source: Source

    def run(self, argv: list[str]) -> int:
        function = resolve_ref(self.ref)
        return int(function(argv) or 0)


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that was skipped, and why (shown by ``mcore plugins``)."""

    plugin: str
    source: Source
    message: str


@dataclass
class PluginHost:
    """The loaded plugins: their registry, CLI commands, lifecycle hooks and problems."""

    manager: pluggy.PluginManager
    registry: Registry
    sources: dict[str, Source] = field(default_factory=dict)
    commands: dict[str, CliCommand] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        """Lifecycle hooks: ``host.hook.mcore_step_end(step=..., metrics=...)``."""
        return self.manager.hook

    def get(self, kind: str, name: str) -> Implementation:
        return self.registry.get(kind, name)

    def load(self, kind: str, name: str) -> Any:
        return self.registry.load(kind, name)


def _strict_default() -> bool:
    return os.environ.get("MCORE_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _distribution_of(module_name: str) -> tuple[str, str]:
    """The distribution that ships ``module_name`` (its entry point's, else its top-level package's)."""
    for ep in _entry_points():
        if ep.value == module_name and ep.dist is not None:
            return ep.dist.name, ep.dist.version
    top = module_name.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top, [])
    except Exception:  # pragma: no cover - metadata backends vary
        dists = []
    for dist in [*dists, top.replace("_", "-")]:  # editable installs often list no top-level names
        try:
            return metadata.distribution(dist).metadata["Name"], metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return f"<module {module_name}>", "unpackaged"


class _Loader:
    def __init__(self, host: PluginHost, strict: bool) -> None:
        self.host = host
        self.strict = strict

    def skip(self, plugin: str, source: Source, message: str) -> None:
        if self.strict:
            raise PluginLoadError(message)
        self.host.problems.append(PluginProblem(plugin, source, message))
        warnings.warn(message, PluginWarning, stacklevel=3)

    def add(self, plugin_name: str, obj: Any, source: Source) -> None:
        api = getattr(obj, "MCORE_PLUGIN_API", None)
        if api is None:
            return self.skip(
                plugin_name,
                source,
                f"mcore plugin {plugin_name!r} from {source} does not declare MCORE_PLUGIN_API and is "
                f"skipped; add `MCORE_PLUGIN_API = {PLUGIN_API_VERSION}` to the plugin module",
            )
        if api not in SUPPORTED_PLUGIN_APIS:
            fits = ", ".join(str(v) for v in SUPPORTED_PLUGIN_APIS)
            return self.skip(
                plugin_name,
                source,
                f"mcore plugin {plugin_name!r} from {source} is built for mcore plugin API {api}, but "
                f"mcore-core {__version__} supports API {fits}; install a release of "
                f"{source.distribution} built for API {fits}, or an mcore-core that supports API {api}",
            )
        manager = self.host.manager
        if plugin_name in self.host.sources:
            return self.skip(
                plugin_name,
                source,
                f"mcore plugin name {plugin_name!r} from {source} is already used by "
                f"{self.host.sources[plugin_name]}; it is skipped",
            )
        try:
            manager.register(obj, name=plugin_name)
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            if manager.is_registered(obj):
                manager.unregister(obj)
            return self.skip(plugin_name, source, f"mcore plugin {plugin_name!r} from {source} is invalid: {exc}")
        self.host.sources[plugin_name] = source

    def call_register_hooks(self) -> None:
        manager = self.host.manager
        for impl in manager.hook.mcore_register.get_hookimpls():
            name = manager.get_name(impl.plugin) or "?"
            source = self.host.sources[name]
            try:
                impl.function(registry=ScopedRegistrar(self.host.registry, source))
            except Exception as exc:  # a broken plugin must not take the others down
                self.host.registry.remove_source(name)
                self.skip(
                    name, source, f"mcore plugin {name!r} from {source} failed to register: {type(exc).__name__}: {exc}"
                )
        for impl in manager.hook.mcore_cli_commands.get_hookimpls():
            name = manager.get_name(impl.plugin) or "?"
            source = self.host.sources[name]

            def add(command: str, ref: str, help: str = "", *, _source: Source = source) -> None:
                if command in self.host.commands:
                    raise UserError(
                        f"CLI command {command!r} from {_source} clashes with the one from "
                        f"{self.host.commands[command].source}"
                    )
                self.host.commands[command] = CliCommand(command, ref, help, _source)

            try:
                impl.function(add=add)
            except Exception as exc:
                self.skip(name, source, f"mcore plugin {name!r} from {source} failed to add CLI commands: {exc}")


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_plugins(
    *,
    entry_points: bool = True,
    env: bool = True,
    unpackaged: bool = True,
    extra: Iterable[Any] = (),
    strict: bool | None = None,
    prefer: str | None = None,
) -> PluginHost:
    """Discover plugins and build a ``PluginHost``.

    Tests pass ``entry_points=False, env=False, unpackaged=False`` and the plugins they need
    in ``extra`` (modules, objects, or ``"module"`` strings), so installed plugins never leak
    into unit tests.
    """
    manager = pluggy.PluginManager("mcore")
    manager.add_hookspecs(hookspecs)
    host = PluginHost(manager, Registry(prefer if prefer is not None else os.environ.get("MCORE_PREFER", "")))
    loader = _Loader(host, _strict_default() if strict is None else strict)

    if entry_points:
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = ep.dist
            source = Source(dist.name if dist else "<unknown>", dist.version if dist else "?", ep.name)
            try:
                obj = ep.load()
            except Exception as exc:
                loader.skip(
                    ep.name,
                    source,
                    f"mcore plugin {ep.name!r} from {source} failed to import: {type(exc).__name__}: {exc}",
                )
                continue
            loader.add(ep.name, obj, source)

    if env:
        for module_name in filter(None, (m.strip() for m in os.environ.get("MCORE_PLUGINS", "").split(","))):
            dist_name, version = _distribution_of(module_name)
            source = Source(dist_name, version, module_name)
            try:
                obj = importlib.import_module(module_name)
            except Exception as exc:
                loader.skip(
                    module_name,
                    source,
                    f"mcore plugin module {module_name!r} from MCORE_PLUGINS failed to import: {type(exc).__name__}: {exc}",
                )
                continue
            loader.add(module_name, obj, source)

    objects = list(extra) + (list(_UNPACKAGED) if unpackaged else [])
    for obj in objects:
        if isinstance(obj, str):
            obj = importlib.import_module(obj)
        name = getattr(obj, "__name__", None) or f"{type(obj).__module__}.{type(obj).__qualname__}"
        if name in host.sources:
            continue  # already loaded through an entry point or MCORE_PLUGINS
        source = (
            Source("<unpackaged>", "-", name)
            if not isinstance(obj, type(os))
            else Source(*_distribution_of(name), name)
        )
        loader.add(name, obj, source)

    loader.call_register_hooks()
    return host
