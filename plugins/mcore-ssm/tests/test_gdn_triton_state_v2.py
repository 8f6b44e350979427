"""The second GDN forward state walk (``mcore_ssm.gdn_triton_state_v2``, the default: ``MCORE_SSM_GDN_FWD`` unset or
``v2``; ``v1`` the first walk): the forward with it against the fp64 recurrence, its ``U`` and chunk states against
the first walk's, and the gradients equal to v1's; in Triton's CPU interpreter (``slow``: a subprocess) and on CUDA
(``gpu``). Each test sets the variable for every path it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssm_cases import rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule

# dk 12 (one key block, masked) and dk 80 (two blocks of 64, the second masked), dv 20 (masked value columns);
# three packed documents (3, 67 and 70 tokens: partial last chunks) with initial states
INTERPRETED = """
import os, torch, torch.nn.functional as F
from mcore_ssm.gdn_triton import gated_delta_rule_triton, launch_for, prepare, run_states
from mcore_ssm.gdn_triton_state_v2 import run_states_v2
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
rel = lambda a, b: float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
errors = []
for dk in (12, 80):
    g = torch.Generator().manual_seed(dk)
    B, T, hk, hv, dv = 2, 70, 1, 2, 20
    q = F.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1)
    v = torch.randn(B, T, hv, dv, generator=g)
    gate = -F.softplus(torch.randn(B, T, hv, generator=g)) * 0.3
    beta = torch.sigmoid(torch.randn(B, T, hv, generator=g))
    cu = torch.tensor([0, 3, 70, 140], dtype=torch.int32)
    h0 = torch.randn(3, hv, dk, dv, generator=g) * 0.3
    args = [t.requires_grad_() for t in (q, k, v, gate, beta, h0)]
    probe = torch.randn(B, T, hv, dv, generator=g)
    probe_s = torch.randn(3, hv, dk, dv, generator=g)
    ref, ref_final = recurrent_gated_delta_rule(
        *(t.detach().double() for t in args[:5]), cu_seqlens=cu, initial_state=h0.detach().double(),
        output_final_state=True,
    )
    results = {}
    for variant in ("v1", "v2"):
        os.environ["MCORE_SSM_GDN_FWD"] = variant
        out, final = gated_delta_rule_triton(*args[:5], cu_seqlens=cu, initial_state=args[5], output_final_state=True)
        grads = torch.autograd.grad((out * probe).sum() + (final * probe_s).sum(), args)
        results[variant] = (out, final, grads)
    out, final, grads = results["v2"]
    errors += [rel(out, ref), rel(final, ref_final)]
    errors += [rel(a, b) for a, b in zip(grads, results["v1"][2])]
    # the walk itself: U and the chunk states of v2 against v1 on the same factors
    launch = launch_for(q, k, v, gate, beta, None, h0, cu, None)
    kc = k.detach().contiguous()
    prepared = prepare(launch, kc, v.detach().contiguous(), gate.detach(), beta.detach(), torch.float32)
    one = run_states(launch, kc, prepared, h0.detach(), final=True, states_dtype=torch.float32)
    two = run_states_v2(launch, kc, prepared, h0.detach(), final=True, states_dtype=torch.float32)
    errors += [rel(a, b) for a, b in zip(two, one)]
    # the WY factors by blocks of 64 key columns (v2) against W at once
    narrow = prepare(launch, kc, v.detach().contiguous(), gate.detach(), beta.detach(), torch.float32, narrow=True)
    errors += [rel(a, b) for a, b in zip(narrow, prepared)]
print(*errors)
"""


@pytest.mark.slow
def test_v2_walk_in_triton_interpreter_equals_reference_and_v1():
    """fp32, packed documents, initial states, dk 12 and 80: output and final state within 1e-5 of the fp64
    recurrence, every gradient within 1e-5 of the v1 path's, ``U``, chunk states, final state of the walk
    and ``W``, ``U~``, ``G`` of the narrow WY launch within 1e-5 of the first version's."""
    errors = run_interpreted(INTERPRETED, 2 * 14)
    assert all(e < 1e-5 for e in errors), errors


def test_the_forward_walk_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_FWD`` unset (or empty) picks v2, ``v1`` the first forward, ``v2`` v2; v2 takes keys padded
    to at most 128 columns, wider ones run v1 whatever the choice; anything else is refused, also for wide keys."""
    from mcore.errors import UserError
    from mcore_ssm.kernel_choice import gdn_fwd, gdn_fwd_for

    monkeypatch.delenv("MCORE_SSM_GDN_FWD", raising=False)
    assert gdn_fwd() == "v2"
    assert [gdn_fwd_for(bk) for bk in (16, 64, 128, 256)] == ["v2", "v2", "v2", "v1"]
    monkeypatch.setenv("MCORE_SSM_GDN_FWD", "")
    assert gdn_fwd() == "v2" and gdn_fwd_for(128) == "v2"
    monkeypatch.setenv("MCORE_SSM_GDN_FWD", "v1")
    assert gdn_fwd() == "v1"
    assert [gdn_fwd_for(bk) for bk in (16, 64, 128, 256)] == ["v1", "v1", "v1", "v1"]
    monkeypatch.setenv("MCORE_SSM_GDN_FWD", "v2")
    assert gdn_fwd() == "v2"
    assert [gdn_fwd_for(bk) for bk in (16, 64, 128, 256)] == ["v2", "v2", "v2", "v1"]
    monkeypatch.setenv("MCORE_SSM_GDN_FWD", "fast")
    for choose in (gdn_fwd, lambda: gdn_fwd_for(256)):
        with pytest.raises(UserError, match="MCORE_SSM_GDN_FWD = 'fast'; allowed: v2, v1"):
            choose()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v2_on_cuda_equals_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """dk = dv = 128 (two key blocks), packed documents with initial states: v1's and v2's outputs and final states
    against the fp64 chunked reference (fp32 < 1e-5, bf16 < 1e-2), v2's gradients equal to v1's."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    gen = torch.Generator().manual_seed(0)
    batch, seq, hk, hv, d = 2, 300, 2, 4, 128
    q = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    v = torch.randn(batch, seq, hv, d, generator=gen)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=gen)) * 0.3
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=gen))
    h0 = torch.randn(4, hv, d, d, generator=gen) * 0.3
    cu = torch.tensor([0, 1, 64, 300, 600], dtype=torch.int32, device="cuda")
    low = [t.cuda().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate((q, k, v, gate, beta))]
    h0 = h0.cuda().requires_grad_()
    exact = [t.detach().double() for t in (*low, h0)]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    probe = torch.randn(ref.shape, device="cuda")
    probe_s = torch.randn(ref_final.shape, device="cuda")
    grads = {}
    for variant in ("v1", "v2"):
        monkeypatch.setenv("MCORE_SSM_GDN_FWD", variant)
        out, final = gated_delta_rule_triton(*low, cu_seqlens=cu, initial_state=h0, output_final_state=True)
        assert out.dtype == dtype and rel(out, ref) < bound and rel(final, ref_final) < bound
        grads[variant] = torch.autograd.grad((out.float() * probe).sum() + (final * probe_s).sum(), [*low, h0])
    for a, b in zip(grads["v2"], grads["v1"], strict=True):
        assert rel(a, b) < bound


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_strong_decay_in_triton_interpreter_is_finite_and_equals_recurrence_per_forward(
    monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """``test_gdn_triton``'s strong-decay case (gates down to -30 and -100 a token, numpy raising on any overflow)
    with each forward named explicitly (v2, the default, and v1, which ``test_gdn_triton`` no longer runs unset):
    every output and gradient finite and within 1e-5 of the fp64 recurrence."""
    from test_gdn_triton import STRONG_DECAY

    monkeypatch.setenv("MCORE_SSM_GDN_FWD", variant)
    errors = run_interpreted(STRONG_DECAY, 16)
    assert all(e < 1e-5 for e in errors), errors
