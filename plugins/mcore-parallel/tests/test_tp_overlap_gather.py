"""The all-gather side of ``[parallel.tp] overlap_chunks`` (``tp_overlap_gather``) on gloo ranks.

Under sequence parallelism with ``overlap_chunks > 1`` each region gathers its input in chunks and
computes every linear reading it (q, k, v, gate, up; GQA head slices when kv heads < tp) chunk by
chunk. Checked against one process and against the unchunked sequence-parallel path, loss and every
gradient (fp32, rel 1e-5) over SGD steps: every such linear's output comes from the chunked GEMMs
(none computed again), a linear called with another tensor computes as without overlap, nothing is
kept once the block has returned, and ``overlap_all_gather = false`` leaves torch's column styles.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mcore.mesh import build_mesh
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear
from mcore_parallel.tp_overlap_gather import ColumnShardLinear, GatheredInputLinear, GatherRegion
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def served_calls(model: torch.nn.Module) -> list[bool]:
    """For each call of a linear that may read a gathered block input: whether its output came from the
    region's chunked GEMMs (filled as the model runs; ``test_tp_compile`` uses it too)."""
    calls: list[bool] = []
    regions = {id(m.tp_gather): m.tp_gather for m in model.modules() if isinstance(m, GatheredInputLinear)}
    for region in regions.values():

        def take(linear: Any, x: torch.Tensor, region: GatherRegion = region) -> Any:
            out = GatherRegion.take(region, linear, x)
            calls.append(out is not None)
            return out

        region.take = take  # type: ignore[method-assign]
    return calls


def _gathered_equals_unchunked(world: int, kv_heads: tuple[int, ...], chunks: int) -> None:
    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    for kv in kv_heads:
        cfg = TinyConfig(fused=False, num_heads=4, num_kv_heads=kv)
        reference = TinyTransformer(cfg, seed=0)
        layouts = {
            "unchunked": TPLayout(TPLayout.Config(sequence_parallel=True)),
            "overlap": TPLayout(TPLayout.Config(sequence_parallel=True, overlap_chunks=chunks)),
            "row side only": TPLayout(
                TPLayout.Config(sequence_parallel=True, overlap_chunks=chunks, overlap_all_gather=False)
            ),
        }
        models = {name: layout.apply(copy.deepcopy(reference), mesh) for name, layout in layouts.items()}
        attn = models["overlap"].layers[0].attn
        assert isinstance(attn.q, GatheredInputLinear) and isinstance(attn.q, ColumnShardLinear)
        assert isinstance(attn.k, GatheredInputLinear)
        assert isinstance(attn.k, HeadSliceLinear) == (kv < world), kv
        assert isinstance(attn.q.weight, DTensor) and attn.q.weight.to_local().shape[0] == attn.q.out_features // world
        assert not isinstance(models["row side only"].layers[0].attn.q, GatheredInputLinear)
        served = served_calls(models["overlap"])
        candidates = 5 * cfg.num_layers  # q, k, v; gate, up
        opts = {
            name: torch.optim.SGD(m.parameters(), lr=0.5) for name, m in [("reference", reference), *models.items()]
        }
        for step in range(2):
            tokens, labels = tiny_batches(1, batch_size=2, vocab_size=cfg.vocab_size, seed=50 + step)[0]
            for opt in opts.values():
                opt.zero_grad()
            want = reference(tokens, labels=labels)
            want.backward()
            grads: dict[str, dict[str, torch.Tensor]] = {}
            served.clear()
            for name, model in models.items():
                loss = model(tokens, labels=labels)
                loss.backward()
                layouts[name].finish_grad_sync()
                what = f"kv_heads={kv} {name} step {step}"
                assert_rel_close(loss.detach(), want.detach(), 1e-5, name=f"{what}: loss")
                grads[name] = {n: _full(p.grad) for n, p in model.named_parameters()}  # type: ignore[arg-type]
                for n, p in reference.named_parameters():
                    assert_rel_close(grads[name][n], p.grad, 1e-5, name=f"{what}: grad of {n}")  # type: ignore[arg-type]
            assert len(served) == candidates and all(served), f"kv_heads={kv}: outputs taken per call {served}"
            for n, g in grads["overlap"].items():  # the chunked path against the unchunked one, directly
                assert_rel_close(g, grads["unchunked"][n], 1e-5, name=f"kv_heads={kv}: overlap vs unchunked {n}")
            for opt in opts.values():
                opt.step()
        for region in {
            id(m.tp_gather): m.tp_gather for m in models["overlap"].modules() if hasattr(m, "tp_gather")
        }.values():
            assert not region._calls, "a call's outputs were kept after the block returned"
        other = torch.randn(2, 16, cfg.hidden_size)  # not the gathered input: computed as without overlap
        weight = attn.q.weight.to_local()
        assert_rel_close(attn.q(other), F.linear(other, weight), 1e-6, name="a candidate called with another tensor")


def _frozen_weights() -> None:
    """Frozen v and up weights (their biases, none here): no gradient for them, the others equal one process."""
    cfg = TinyConfig(fused=False, num_heads=4, num_kv_heads=2)
    reference = TinyTransformer(cfg, seed=0)
    for layer in reference.layers:
        layer.attn.v.weight.requires_grad_(False)
        layer.mlp.up.weight.requires_grad_(False)
    layout = TPLayout(TPLayout.Config(sequence_parallel=True, overlap_chunks=2))
    model = layout.apply(copy.deepcopy(reference), build_mesh(("tp",), {}, fill="tp", device_type="cpu"))
    served = served_calls(model)
    tokens, labels = tiny_batches(1, batch_size=2, vocab_size=cfg.vocab_size, seed=60)[0]
    reference(tokens, labels=labels).backward()
    model(tokens, labels=labels).backward()
    layout.finish_grad_sync()
    assert len(served) == 5 * cfg.num_layers and all(served), served
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and want[name].grad is None, name
            continue
        assert_rel_close(_full(p.grad), want[name].grad, 1e-5, name=f"frozen v/up: grad of {name}")  # type: ignore[arg-type]


def test_frozen_weights_get_no_gradient() -> None:
    run_distributed(_frozen_weights, 2, timeout=120)


def test_gathered_gemms_equal_unchunked_on_two_ranks() -> None:
    """kv heads split (2 for tp2) and kept whole (1 for tp2: head slices), 3 chunks of a rank's 8 tokens."""
    run_distributed(_gathered_equals_unchunked, 2, 2, (2, 1), 3, timeout=180)


@pytest.mark.slow
def test_gathered_gemms_equal_unchunked_on_four_ranks() -> None:
    """tp4: kv heads 2 (head slices) and 4 (split); more chunks than a rank's 4 tokens (one token each)."""
    run_distributed(_gathered_equals_unchunked, 4, 4, (2, 4), 8, timeout=240)
