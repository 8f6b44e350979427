"""mcore-optim: optimizers for mcore, registered as plugins.

Importing this package imports no torch; the registered implementations live in their own
modules (``adamw``, ``distributed_adamw``, ``muon``, ``layerwise``) and are
loaded by the core's registry on first use.
"""

from mcore_optim.__about__ import __version__

__all__ = ["__version__"]
