"""mcore-ssm: recurrent token mixers (Gated DeltaNet, Mamba2) for hybrid models.

Importing this package imports no torch module (the plugin registry lists it cheaply).
"""

from __future__ import annotations

from mcore_ssm.__about__ import __version__

__all__ = ["__version__"]
