"""On a CUDA device: AdamW (the Triton kernel) against torch's fused AdamW, Muon and bf16 Newton-Schulz against references (run with ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from helpers import SINGLE, batches, tiny_model, train
from test_newton_schulz import SHAPES, spectrum_matrix

from mcore_optim.adamw import AdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import COEFFICIENT_SETS, orthogonalize
from mcore_testing.numerics import assert_rel_close

pytestmark = pytest.mark.gpu


def on_cuda(data):
    return [(x.cuda(), y.cuda()) for x, y in data]


def test_fused_adamw_matches_torch_fused_on_cuda() -> None:
    ours, ref = tiny_model().cuda(), tiny_model().cuda()
    opt = AdamWFactory(AdamWFactory.Config(lr=3e-3, no_decay_roles=())).build(ours, mesh=SINGLE, layouts=[])
    assert opt.triton  # impl=auto picks the one-pass Triton kernel on CUDA (torch's fused one where it cannot)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    data = on_cuda(batches(5))
    train(ours, opt, data)
    train(ref, torch_opt, data)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_rel_close(p, q, tol=1e-6, name=name)


def test_muon_on_cuda_tracks_fp64_reference() -> None:
    """Muon on the GPU (fp32 Newton-Schulz, no TF32) against the same optimizer in fp64 on the CPU.

    Compared on the change the steps make (the parameters themselves barely move); the
    harness's fp32 tolerance, 1e-5 (the CPU's fp32 run lands at 3e-6).
    """
    assert not torch.backends.cuda.matmul.allow_tf32
    config = {"lr": 0.01, "split_heads": True, "adamw_impl": "foreach"}
    gpu, cpu = tiny_model().cuda(), tiny_model().double()
    opt_gpu = MuonFactory(MuonFactory.Config(**config, ns_dtype="float32")).build(gpu, mesh=SINGLE, layouts=[])
    opt_cpu = MuonFactory(MuonFactory.Config(**config, ns_dtype="float64")).build(cpu, mesh=SINGLE, layouts=[])
    data = batches(3)
    train(gpu, opt_gpu, on_cuda(data))
    train(cpu, opt_cpu, data)
    start = dict(tiny_model().named_parameters())
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        begin = start[name].detach().double()
        assert_rel_close(p.detach().cpu().double() - begin, q.detach() - begin, tol=1e-5, name=name)


@pytest.mark.parametrize("name", sorted(COEFFICIENT_SETS))
def test_bf16_newton_schulz_on_cuda_stays_in_band(name: str) -> None:
    cs = COEFFICIENT_SETS[name]
    lo, hi = cs.band[0] - cs.bf16_slack, cs.band[1] + cs.bf16_slack
    for i, (rows, cols) in enumerate(SHAPES):
        g = spectrum_matrix(rows, cols, cs.min_sigma, seed=i).float().cuda()
        sv = torch.linalg.svdvals(orthogonalize(g[None], cs.triples)[0].double().cpu())
        assert lo <= sv.min().item() and sv.max().item() <= hi, (name, rows, cols, sv.min(), sv.max())
