"""The GDN backward's opt-in kernels (issue 22; not yet run on a GPU): the reverse state walk of
``mcore_ssm.gdn_triton_state_bwd_v2`` (``MCORE_SSM_GDN_STATE_BWD=v2``) and the split terms' first kernel loading
the ``T`` that the backward's rerun of the WY kernel stored (``MCORE_SSM_GDN_PAIRS_T=saved``), against the fp64
recurrence and the default backward, in Triton's CPU interpreter (``slow``: a subprocess) and on CUDA (``gpu``);
and the backward's fp32 rerun by the forward's own kernels (v2 by default). Each test sets the variables for every
path it runs; the choices are read when the forward starts (``kernel_choice.gdn_kernels_for``)."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import bench_like_inputs, rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

# dk 12 (one key block, masked) and dk 80 (two blocks of 64, the second masked), dv 20 and 40 (masked value
# columns; 40: two blocks of 32); three packed documents (3, 67, 70 tokens: partial chunks); weak and -30 gates;
# with initial states and the final state's gradient, and without either (no dS' to start the walk from)
INTERPRETED = """
import os, torch, torch.nn.functional as F
from ssm_cases import small_packed_case
from mcore_ssm.gdn_triton import gated_delta_rule_triton, launch_for
from mcore_ssm.gdn_triton_bwd import rerun_forward
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
rel = lambda a, b: float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
OPT_IN = {"MCORE_SSM_GDN_STATE_BWD": "v2", "MCORE_SSM_GDN_PAIRS_T": "saved"}
errors = []
for dk, dv, gate_min, states in ((12, 20, -1.0, True), (80, 40, -30.0, True), (80, 40, -1.0, False)):
    c = small_packed_case(dk, dv, gate_min)  # fp32
    q, k, v, gate, beta, cu, h0 = (c[n] for n in ("q", "k", "v", "gate", "beta", "cu", "h0"))
    args = [t.requires_grad_() for t in (q, k, v, gate, beta, h0)][: 6 if states else 5]
    probe, probe_s = c["probe"], c["probe_s"]
    exact = [t.detach().double().requires_grad_() for t in args]
    options = dict(cu_seqlens=cu, output_final_state=states)
    ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5] if states else None, **options)
    loss = (ref * probe.double()).sum() + ((ref_final * probe_s.double()).sum() if states else 0.0)
    want = torch.autograd.grad(loss, exact)
    results = {}
    for name, env in (("default", {"MCORE_SSM_GDN_STATE_BWD": "v1"}), ("state v2", {"MCORE_SSM_GDN_STATE_BWD": "v2"}),
                      ("saved T", {"MCORE_SSM_GDN_PAIRS_T": "saved"}), ("both", OPT_IN)):
        for key in OPT_IN:
            os.environ.pop(key, None)
        os.environ.update(env)
        out, final = gated_delta_rule_triton(*args[:5], initial_state=args[5] if states else None, **options)
        for key in OPT_IN:
            os.environ.pop(key, None)  # the backward runs what the forward chose
        loss = (out * probe).sum() + ((final * probe_s).sum() if states else 0.0)
        results[name] = torch.autograd.grad(loss, args)
    for name in ("state v2", "saved T", "both"):
        errors += [rel(a, b) for a, b in zip(results[name], want)]
        errors += [rel(a, b) for a, b in zip(results[name], results["default"])]
    # the backward's fp32 rerun: v2's factors and states (and the stored T's) against v1's
    launch = launch_for(q, k, v, gate, beta, None, h0 if states else None, cu, None)
    inputs = (k.detach(), v.detach(), gate.detach(), beta.detach(), h0.detach() if states else None)
    one = rerun_forward(launch, *inputs, "v1", keep_inverse=True)
    two = rerun_forward(launch, *inputs, "v2", keep_inverse=True)
    errors += [rel(a, b) for a, b in zip(two, one)]
print(*errors)
"""


@pytest.mark.slow
def test_opt_in_backward_kernels_in_interpreter_equal_fp64_recurrence_and_default():
    """fp32, dk 12 and 80, packed documents, weak and -30 gates, with and without states: every gradient of the
    state walk v2, of the saved ``T`` and of both within 1e-5 of the fp64 recurrence's and of the default
    backward's; the backward's v2 rerun (``U``, chunk states, ``W``, ``T``) within 1e-5 of the v1 rerun."""
    # per case: three opt-ins x (fp64, default) x 6 gradients (5 without states), and the rerun's 4 tensors
    errors = run_interpreted(INTERPRETED, 2 * (3 * 2 * 6 + 4) + (3 * 2 * 5 + 4))
    assert all(e < 1e-5 for e in errors), errors


def test_backward_choices_are_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_STATE_BWD`` unset (or empty) picks v2 (the default since 2026-12-07) for keys padded to at most
    128 columns (v1 for wider ones), ``v1`` v1; ``MCORE_SSM_GDN_PAIRS_T`` unset picks ``recompute``, ``saved`` saved; anything else is a
    ``UserError`` naming the allowed values, when a forward starts (``gdn_kernels_for``)."""
    from mcore.errors import UserError
    from mcore_ssm.kernel_choice import gdn_kernels_for, gdn_pairs_t, gdn_state_bwd_for

    for name in ("MCORE_SSM_GDN_STATE_BWD", "MCORE_SSM_GDN_PAIRS_T", "MCORE_SSM_GDN_FWD", "MCORE_SSM_GDN_CHUNK_BWD"):
        monkeypatch.delenv(name, raising=False)
    assert [gdn_state_bwd_for(bk) for bk in (16, 128, 256)] == ["v2", "v2", "v1"]
    assert gdn_pairs_t() == "recompute"
    chosen = gdn_kernels_for(128)
    assert (chosen.forward, chosen.terms, chosen.state_bwd, chosen.pairs_t) == ("v2", "split", "v2", "recompute")
    monkeypatch.setenv("MCORE_SSM_GDN_STATE_BWD", "")
    assert gdn_state_bwd_for(128) == "v2"
    monkeypatch.setenv("MCORE_SSM_GDN_STATE_BWD", "v1")
    assert [gdn_state_bwd_for(bk) for bk in (16, 128, 256)] == ["v1", "v1", "v1"]
    monkeypatch.setenv("MCORE_SSM_GDN_STATE_BWD", "v2")
    monkeypatch.setenv("MCORE_SSM_GDN_PAIRS_T", "saved")
    assert [gdn_state_bwd_for(bk) for bk in (16, 128, 256)] == ["v2", "v2", "v1"]
    chosen = gdn_kernels_for(256)
    assert (chosen.forward, chosen.state_bwd, chosen.pairs_t) == ("v1", "v1", "saved")
    for name, allowed in (("MCORE_SSM_GDN_STATE_BWD", "v2, v1"), ("MCORE_SSM_GDN_PAIRS_T", "recompute, saved")):
        monkeypatch.setenv(name, "fast")
        with pytest.raises(UserError, match=f"{name} = 'fast'; allowed: {allowed}"):
            gdn_kernels_for(128)
        monkeypatch.delenv(name)


OPT_INS = ({"MCORE_SSM_GDN_STATE_BWD": "v2"}, {"MCORE_SSM_GDN_PAIRS_T": "saved"})


@pytest.mark.gpu
@pytest.mark.parametrize("env", [*OPT_INS, {k: v for env in OPT_INS for k, v in env.items()}], ids=str)
def test_opt_in_bf16_backward_within_1e2_of_fp64_and_near_default(monkeypatch: pytest.MonkeyPatch, env) -> None:
    """dk = dv = 128, two value heads per q/k head, bf16, packed documents with partial chunks, initial states and the
    final state's gradient: every gradient of the opt-in within 1e-2 of the fp64 torch chunked form's and of the
    default backward's (bf16 results: one rounding step is 4e-3), and the same bits twice (no atomics)."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    probe, probe_s = torch.randn_like(ref), torch.randn_like(ref_final)
    want = torch.autograd.grad((ref * probe).sum() + (ref_final * probe_s).sum(), exact)

    def grads(chosen: dict[str, str], twice: bool = False) -> list[tuple[torch.Tensor, ...]]:
        for name in ("MCORE_SSM_GDN_STATE_BWD", "MCORE_SSM_GDN_PAIRS_T"):
            monkeypatch.delenv(name, raising=False)
        for name, value in chosen.items():
            monkeypatch.setenv(name, value)
        out, final = gated_delta_rule_triton(
            *leaves[:5], cu_seqlens=cu, initial_state=leaves[5], output_final_state=True
        )
        loss = (out.double() * probe).sum() + (final.double() * probe_s).sum()
        first = torch.autograd.grad(loss, leaves, retain_graph=twice)
        return [first, torch.autograd.grad(loss, leaves)] if twice else [first]

    got, again = grads(env, twice=True)
    default = grads({"MCORE_SSM_GDN_STATE_BWD": "v1"})[0]  # the first walk (dk > 128 still runs it)
    assert [t.dtype for t in got] == [t.dtype for t in leaves]
    for a, b, d, e in zip(got, again, default, want, strict=True):
        assert torch.equal(a, b)
        assert rel(a, e) < 1e-2 and rel(a, d) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("env", [*OPT_INS, {k: v for env in OPT_INS for k, v in env.items()}], ids=str)
def test_opt_in_fp32_backward_equals_fp64_recurrence_at_strong_gates(monkeypatch: pytest.MonkeyPatch, env) -> None:
    """fp32 at dk = dv = 128 (the ieee path) with gates down to -30 a token: every gradient of the opt-in within
    1e-5 of the fp64 recurrence's."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    leaves = bench_like_inputs(torch.float32)
    leaves[3] = torch.rand(leaves[3].shape, device="cuda") * -30.0
    leaves = [t[:, :300].contiguous() if i < 5 else t[:2] for i, t in enumerate(leaves)]  # (2, 300): rows
    leaves = [t.requires_grad_() for t in leaves]
    out, final = gated_delta_rule_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5], output_final_state=True)
    probe, probe_s = torch.randn_like(ref), torch.randn_like(ref_final)
    got = torch.autograd.grad((out.double() * probe).sum() + (final.double() * probe_s).sum(), leaves)
    want = torch.autograd.grad((ref * probe).sum() + (ref_final * probe_s).sum(), exact)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-5
