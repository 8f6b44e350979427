"""Version of the mcore-models distribution (read by hatchling)."""

__version__ = "0.1.0"
