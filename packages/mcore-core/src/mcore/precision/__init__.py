"""The core's own precision recipes: ``fp32`` and ``bf16`` (low-precision formats live in plugins)."""
