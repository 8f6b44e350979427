"""The training runtime: compose a run from names and train it.

``mcore.train.run(config, host)`` builds the model, precision recipe, layouts, mesh and
optimizer that ``config`` names, then runs the loop in ``mcore.train.loop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcore.train.loop import RunResult

__all__ = ["RunResult", "run"]


def run(config: Any, host: Any, **kwargs: Any) -> RunResult:
    """Train ``config`` (a ``RunConfig``) with the plugins of ``host``; see ``mcore.train.loop.run``."""
    from mcore.train.loop import run as _run

    return _run(config, host, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from mcore.train.loop import RunResult

        return RunResult
    raise AttributeError(name)
