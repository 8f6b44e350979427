"""The package version, read by hatchling (``[tool.hatch.version]``) and by ``mcore plugins``."""

__version__ = "0.2.0"
