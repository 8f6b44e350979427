"""The memory planner behind ``mcore plan``: per-rank memory of a run before launching it."""
