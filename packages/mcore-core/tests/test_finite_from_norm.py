"""A step's finiteness is judged from the global gradient norm: a plain recipe is told so (``finite_from_norm``)
and skips its own pass over every gradient, yet a step whose loss is finite and whose gradients are not is still
skipped, on every rank alike; a recipe that scans for itself is still asked without the keyword."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist
from test_train_loop import make_config, make_corpus

from mcore.plugins import hookimpl
from mcore.precision.basic import FP32
from mcore.train import run
from mcore.train.loop import not_finite_flag
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import LayoutsPlugin
from mcore_testing.reference import TinyTransformer, tiny_batches


class _InfGradient(torch.autograd.Function):
    """The identity forward; the backward multiplies the incoming gradient by ``inf`` (a finite loss whose
    gradients are Inf, or NaN where they were 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


class InfGradAt:
    """A plugin whose model's gradients are Inf/NaN (its loss finite) at chosen forward calls, on chosen ranks."""

    MCORE_PLUGIN_API = 1

    def __init__(self, bad_calls: set[int], ranks: set[int] | None = None) -> None:
        self.bad_calls, self.ranks = bad_calls, ranks

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        bad_calls, ranks = self.bad_calls, self.ranks

        class Factory(TinyModelFactory):
            @staticmethod
            def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> Any:
                model = TinyModelFactory.build(config, seed=seed, device=device)
                inner, calls = model.forward, [0]
                rank = dist.get_rank() if dist.is_initialized() else 0

                def forward(tokens: Any, *, labels: Any = None, ctx: Any = None) -> Any:
                    calls[0] += 1
                    out = inner(tokens, labels=labels, ctx=ctx)
                    bad = calls[0] in bad_calls and (ranks is None or rank in ranks)
                    return _InfGradient.apply(out) if bad else out

                model.forward = forward
                return model

        registry.add("model", "inf-grad-tiny", Factory)


class ScanningFP32(FP32):
    """fp32 whose ``unscale_grads`` takes no ``finite_from_norm``: the loop must call it as before."""

    name = "scanning-fp32"
    calls: ClassVar[list[tuple[Any, ...]]] = []

    def unscale_grads(self, model: torch.nn.Module) -> bool | torch.Tensor:
        ScanningFP32.calls.append(())
        return super().unscale_grads(model)


class ScanningPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("precision", "scanning-fp32", f"{__name__}:ScanningFP32", summary="tests: no finite_from_norm")


def _records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["fp32", "scanning-fp32"])
def test_a_finite_loss_with_non_finite_gradients_is_skipped(recipe: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", InfGradAt({5, 6}), ScanningPlugin())  # step 3 (2 micro-batches)
    ScanningFP32.calls.clear()
    update = {"model": {"name": "inf-grad-tiny"}, "precision": {"recipe": recipe}, "log": {"every": 1}}
    cfg = make_config(host, tmp_path / "r", make_corpus(tmp_path), update)
    with pytest.warns(RuntimeWarning, match="step 3 skipped: a gradient is NaN or Inf"):
        result = run(cfg, host)
    assert result.steps_done == 6 and math.isfinite(result.losses[3])
    assert [r["skipped"] for r in _records(tmp_path / "r")] == [False, False, True, False, False, False]
    assert len(ScanningFP32.calls) == (6 if recipe == "scanning-fp32" else 0)


def test_the_plain_recipe_scans_only_when_not_told() -> None:
    model = TinyTransformer(seed=0)
    tokens, labels = tiny_batches(1, seed=1)[0]
    model(tokens, labels=labels).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")  # type: ignore[union-attr]
    assert bool(FP32().unscale_grads(model)) is False  # the conformance contract: asked plainly, it looks
    assert FP32().unscale_grads(model, finite_from_norm=True) is True  # told, it leaves it to the norm


@pytest.mark.parametrize(
    ("finite", "norm", "bad"),
    [
        (True, 1.0, 0.0),
        (True, math.inf, 1.0),
        (True, math.nan, 1.0),
        (False, 1.0, 1.0),
        (torch.tensor(True), 2.0, 0.0),
        (torch.tensor(False), 2.0, 1.0),
        (torch.tensor(True), math.nan, 1.0),
    ],
)
def test_not_finite_flag_combines_the_recipe_and_the_norm(finite: Any, norm: float, bad: float) -> None:
    flag = not_finite_flag(finite, torch.tensor(norm), torch.device("cpu"))
    assert flag.dtype == torch.float64 and flag.shape == () and float(flag) == bad


def _one_rank_goes_bad(root: str, corpus: str) -> None:
    # step 3 (one micro-batch a rank), rank 1's gradients only
    host = isolated_host("mcore_testing.plugin", InfGradAt({3}, ranks={1}), LayoutsPlugin())
    update = {"model": {"name": "inf-grad-tiny"}, "parallel": {"layouts": ["test-ddp"]}, "log": {"every": 1}}
    out = Path(root) / "run"
    with pytest.warns(RuntimeWarning, match="step 3 skipped: a gradient is NaN or Inf"):
        result = run(make_config(host, out, corpus, update), host)
    assert result.steps_done == 6
    if dist.get_rank() == 0:
        assert [r["skipped"] for r in _records(out)] == [False, False, True, False, False, False]
    losses = torch.tensor([result.losses[step] for step in range(1, 7)], dtype=torch.float64)
    assert torch.isfinite(losses).all()  # the bad update was not applied on either rank
    gathered = [torch.empty_like(losses) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, losses)
    assert torch.equal(gathered[0], gathered[1])


def test_one_rank_with_non_finite_gradients_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    run_distributed(_one_rank_goes_bad, 2, str(tmp_path), make_corpus(tmp_path), timeout=180)
