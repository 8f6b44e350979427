"""User-facing error types. The CLI turns any ``UserError`` into its message and exit code 2."""

from __future__ import annotations

#: The exit code of a command that ended on a ``UserError`` (bad input, a stopped peer rank...).
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Something the user can fix: a name, a value, a path. The message says what and how."""


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key, the value and what is allowed."""


class UnknownNameError(UserError):
    """No implementation of that kind has that name."""


class DuplicateNameError(UserError):
    """Two distributions register the same (kind, name)."""


class PluginLoadError(RuntimeError):
    """A plugin failed to load (raised instead of warning under ``MCORE_STRICT_PLUGINS=1``)."""


class PluginWarning(UserWarning):
    """A plugin was skipped; the others still work."""
