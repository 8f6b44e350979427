"""The core's own parallel layouts (only ``single``; real ones live in plugins)."""
