"""The hooks a plugin may implement. Host name ``mcore``; every hook is prefixed ``mcore_``.

A plugin is a module (or object) with ``MCORE_PLUGIN_API = <int>`` and functions decorated
with ``mcore.plugins.hookimpl``. Only ``mcore_register`` is needed to provide
implementations; the others observe a run or extend the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mcore")
hookimpl = pluggy.HookimplMarker("mcore")


@hookspec
def mcore_register(registry: Any) -> None:
    """Register implementations: ``registry.add(kind, name, "module:attr", summary=...)``.

    References are strings, resolved on first use, so registering imports nothing heavy.
    """


@hookspec
def mcore_cli_commands(add: Callable[..., None]) -> None:
    """Add CLI subcommands: ``add(name, "module:function", help="...")``.

    ``function(argv: list[str]) -> int`` receives the arguments after the subcommand and
    returns the exit code; it is imported only when the subcommand runs.
    """


@hookspec
def mcore_run_start(config: Any, mesh: Any) -> None:
    """A training run has built its model and optimizer and is about to take its first step."""


@hookspec
def mcore_step_end(step: int, metrics: dict[str, float]) -> None:
    """A training step finished; ``metrics`` holds at least ``loss``, ``lr``, ``tokens_per_s``."""


@hookspec
def mcore_checkpoint_saved(step: int, path: str) -> None:
    """A checkpoint was written completely (after the atomic rename) at ``path``."""


@hookspec
def mcore_run_end(step: int, metrics: dict[str, float]) -> None:
    """A training run ended (normally or by its NaN/spike policy) at ``step``."""
