"""The end-of-run plot: loss (and eval loss) over steps, with the learning rate on a second axis."""

from __future__ import annotations

import warnings
from pathlib import Path

from mcore.observe.metrics import read_metrics


def plot_run(metrics_file: Path, out: Path) -> Path | None:
    """Write ``out`` (PNG) from ``metrics.jsonl``; ``None`` (with a warning) without matplotlib."""
    records = read_metrics(metrics_file)
    train = [r for r in records if r.get("loss") is not None]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("log.plot = true but matplotlib is missing; pip install matplotlib", stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", color="tab:orange"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr = [r for r in train if r.get("lr") is not None]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lr], [r["lr"] for r in lr], label="learning rate", color="tab:green", alpha=0.6)
        ax2.set_ylabel("learning rate")
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
