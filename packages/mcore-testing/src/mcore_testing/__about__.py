"""Single source of the mcore-testing version."""

__version__ = "0.1.1"
