"""The GDN v2 state walk launched with the value blocks of one (segment, head) next to each other (opt-in
``MCORE_SSM_GDN_WALK_ORDER=blocks``; issue 22; not yet run on a GPU): the same programs in another order, so the same
results, bit for bit in Triton's CPU interpreter (fixed configs), and within the usual tolerances of the fp64
recurrence on CUDA (``gpu``: the autotuner may pick another config per order)."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import bench_like_inputs, rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

NAME = "MCORE_SSM_GDN_WALK_ORDER"

# dk 80 -> 128 padded keys (two 64-key blocks, the second masked) and dv 40 -> two value blocks of 32; dk 12, dv 20:
# one of each; packed documents (3, 67, 70 tokens), -30 and weak gates, initial and final states; fp32 and the
# backward's scratch in fp16 (MCORE_SSM_GDN_BWD_SCRATCH=inputs) so that both reruns' walks take the order
INTERPRETED = """
import os, torch, torch.nn.functional as F
from ssm_cases import small_packed_case
from mcore_ssm.gdn_triton import gated_delta_rule_triton, launch_for, prepare
from mcore_ssm.gdn_triton_state_v2 import run_states_v2
NAMES = ("MCORE_SSM_GDN_WALK_ORDER", "MCORE_SSM_GDN_BWD_SCRATCH")
flags = []
CASES = ((80, 40, -30.0, torch.float32, "fp32"), (12, 20, -1.0, torch.float16, "inputs"))
for dk, dv, gate_min, dtype, scratch in CASES:
    c = small_packed_case(dk, dv, gate_min)  # fp32
    q, k, v = (c[n].to(dtype) for n in ("q", "k", "v"))
    gate, beta, cu, h0 = (c[n] for n in ("gate", "beta", "cu", "h0"))
    probe, probe_s = c["probe"].double(), c["probe_s"].double()
    args = [t.requires_grad_() for t in (q, k, v, gate, beta, h0)]
    results = []
    for order in ("segments", "blocks"):
        os.environ.update({"MCORE_SSM_GDN_WALK_ORDER": order, "MCORE_SSM_GDN_BWD_SCRATCH": scratch})
        out, final = gated_delta_rule_triton(*args[:5], initial_state=args[5], cu_seqlens=cu, output_final_state=True)
        for key in NAMES:
            os.environ.pop(key, None)
        loss = (out.double() * probe).sum() + (final.double() * probe_s).sum()
        results.append([out, final, *torch.autograd.grad(loss, args)])
    flags += [float(not torch.equal(a, b)) for a, b in zip(*results)]
    # the walk alone: U, the chunk states and the final state in either order
    launch = launch_for(q, k, v, gate, beta, None, h0, cu, None)
    prepared = prepare(launch, k.detach(), v.detach(), gate, beta, torch.float32, narrow=True)
    walks = [run_states_v2(launch, k.detach(), prepared, h0.detach(), final=True, states_dtype=torch.float32,
                           blocks_first=first) for first in (False, True)]
    flags += [float(not torch.equal(a, b)) for a, b in zip(*walks)]
print(*flags)
"""


@pytest.mark.slow
def test_walk_order_changes_no_bit_in_interpreter() -> None:
    """fp32 (dk 80, dv 40: two key and two value blocks, gates to -30) and fp16 with the backward's scratch in fp16
    (dk 12, dv 20), packed documents with initial and final states: the output, final state and every gradient with
    ``MCORE_SSM_GDN_WALK_ORDER=blocks`` equal the default order's, and so do the walk's ``U``, chunk states and final
    state called directly."""
    flags = run_interpreted(INTERPRETED, 2 * (8 + 3))
    assert flags == [0.0] * len(flags), flags


def test_walk_order_is_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_WALK_ORDER`` unset (or empty) picks ``segments``, ``blocks`` blocks; anything else is a
    ``UserError`` naming the allowed values when a forward starts (``gdn_kernels_for``)."""
    from mcore.errors import UserError
    from mcore_ssm.kernel_choice import gdn_kernels_for

    monkeypatch.delenv(NAME, raising=False)
    assert gdn_kernels_for(128).walk_order == "segments"
    monkeypatch.setenv(NAME, "")
    assert gdn_kernels_for(128).walk_order == "segments"
    monkeypatch.setenv(NAME, "blocks")
    assert gdn_kernels_for(128).walk_order == "blocks"
    monkeypatch.setenv(NAME, "heads")
    with pytest.raises(UserError, match=f"{NAME} = 'heads'; allowed: segments, blocks"):
        gdn_kernels_for(128)


def _run(
    monkeypatch: pytest.MonkeyPatch,
    leaves: list[torch.Tensor],
    probes: tuple[torch.Tensor, ...],
    order: str,
    **options: torch.Tensor,
) -> list[torch.Tensor]:
    """``[out, final, *grads]`` of ``<out, probe> + <final, probe_s>`` with ``MCORE_SSM_GDN_WALK_ORDER=order``."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    monkeypatch.setenv(NAME, order)
    out, final = gated_delta_rule_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True, **options)
    monkeypatch.delenv(NAME)
    loss = (out.double() * probes[0]).sum() + (final.double() * probes[1]).sum()
    return [out, final, *torch.autograd.grad(loss, leaves)]


@pytest.mark.gpu
def test_walk_order_bf16_within_1e2_of_fp64_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """dk = dv = 128, bf16, packed documents with initial states (``bench_like_inputs``): output, final state and
    every gradient with the value blocks launched together within 1e-2 of the fp64 torch chunked form's and of the
    default order's."""
    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = [ref, ref_final, *torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)]
    got = _run(monkeypatch, leaves, probes, "blocks", cu_seqlens=cu)
    default = _run(monkeypatch, leaves, probes, "segments", cu_seqlens=cu)
    for a, d, e in zip(got, default, want, strict=True):
        assert rel(a, e) < 1e-2 and rel(a, d) < 1e-2


@pytest.mark.gpu
def test_walk_order_fp32_equals_fp64_recurrence_at_strong_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 at dk = dv = 128 (ieee) with gates down to -30: output, final state and every gradient with the value
    blocks launched together within 1e-5 of the fp64 recurrence's."""
    leaves = bench_like_inputs(torch.float32, gate_min=-30.0)
    leaves = [t[:, :300].contiguous() if i < 5 else t[:2] for i, t in enumerate(leaves)]  # (2, 300): rows
    leaves = [t.requires_grad_() for t in leaves]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = [ref, ref_final, *torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)]
    for a, e in zip(_run(monkeypatch, leaves, probes, "blocks"), want, strict=True):
        assert rel(a, e) < 1e-5
