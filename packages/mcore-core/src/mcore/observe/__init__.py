"""Observability of a run: metrics files, TensorBoard, progress display, plots, per-layer stats."""
