"""mcore-models: GPT-family blocks and models for mcore, with Triton kernels and Hugging Face interop.

Importing this package imports nothing heavy; the registry reaches the blocks and models
through lazy references (see ``mcore_models.plugin``).
"""

from mcore_models.__about__ import __version__

__all__ = ["__version__"]
