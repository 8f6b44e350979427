"""Per-layer statistics on request: parameter and gradient norms, activation RMS, forward time.

Hooks on each block of the model's ``layers`` list record the RMS of its output and its
forward wall time during a step chosen by ``log.layer_stats_every``; after backward the
block's parameter and gradient norms are read. Rows go to ``layer_stats.jsonl``. With
sharded (DTensor) parameters the norms are of the local shards (labelled as such).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcore.train.recompute import find_blocks


class LayerStats:
    def __init__(self, model: nn.Module, out: Path, *, enabled: bool) -> None:
        self.blocks = find_blocks(model)
        self.out = out
        self.enabled = enabled and bool(self.blocks)
        self.active = False
        self._rows: dict[int, dict[str, Any]] = {}
        self._t0: dict[int, float] = {}
        if self.enabled:
            for i, block in enumerate(self.blocks):
                block.register_forward_pre_hook(self._pre(i))
                block.register_forward_hook(self._post(i))

    def _pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self.active:
                self._t0[i] = time.perf_counter()

        return hook

    def _post(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active or not torch.is_tensor(output):
                return
            with torch.no_grad():
                out = output.to_local() if hasattr(output, "to_local") else output
                rms = float(out.detach().float().pow(2).mean().sqrt())
            row = self._rows.setdefault(i, {"layer": i, "forward_ms": 0.0, "act_rms": 0.0, "calls": 0})
            row["forward_ms"] += 1000 * (time.perf_counter() - self._t0.get(i, time.perf_counter()))
            row["act_rms"] += rms
            row["calls"] += 1

        return hook

    def begin(self) -> None:
        self.active = self.enabled
        self._rows = {}

    def end(self, step: int) -> None:
        """After backward: add norms, write one row per layer."""
        if not self.active:
            return
        self.active = False
        with self.out.open("a") as f:
            for i, block in enumerate(self.blocks):
                row = self._rows.get(i, {"layer": i, "forward_ms": 0.0, "act_rms": 0.0, "calls": 0})
                calls = max(1, row.pop("calls"))
                row["act_rms"] /= calls
                p2 = g2 = 0.0
                for p in block.parameters():
                    local = p.to_local() if hasattr(p, "to_local") else p
                    p2 += float(local.detach().float().pow(2).sum())
                    if p.grad is not None:
                        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                        g2 += float(g.detach().float().pow(2).sum())
                row.update(step=step, param_norm=p2**0.5, grad_norm=g2**0.5)
                f.write(json.dumps(row) + "\n")
