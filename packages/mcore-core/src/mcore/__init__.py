"""mcore: a small core of protocols and a plugin registry for training and serving LLMs.

Importing ``mcore`` imports no ``torch``: listing plugins and reading configs stay fast.
"""

from mcore.__about__ import PLUGIN_API_VERSION, __version__

__all__ = ["PLUGIN_API_VERSION", "__version__"]
