"""The GDN backward with its scratch in the inputs' 16-bit dtype (opt-in ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``; issue
22; not yet run on a GPU): the forward rerun's ``W``, ``U~``, ``U`` and chunk states, the state gradients ``dS'`` and
``dR_u`` kept in the inputs' dtype and the dots on them on 16-bit operands (fp32 accumulate), against the fp64
recurrence and the default (fp32) backward.

Triton's CPU interpreter computes bf16 dots wrongly (NaN and huge values even for the default backward: numpy has no
bf16), so the interpreter test runs the opt-in's code paths with fp16 inputs (the same kernels: their operand dtype is
the scratch pointers' element type); the ``gpu`` tests run bf16 at the bench's head dims. fp32 inputs must not change
at all: the opt-in leaves them in fp32 (bit-equal gradients)."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import bench_like_inputs, rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

NAME = "MCORE_SSM_GDN_BWD_SCRATCH"

# dk 12 (one key block, masked) and dk 80 (two blocks of 64, the second masked), dv 20 and 40; three packed documents
# (3, 67, 70 tokens: partial chunks), weak and -30 gates, with initial states and the final state's gradient and
# without; each with the v1 and the v2 (default) state walks, doubling and a saved T; against the fp32 scratch
INTERPRETED = """
import os, torch, torch.nn.functional as F
from ssm_cases import small_packed_case
from mcore_ssm.gdn_triton import gated_delta_rule_triton, launch_for
from mcore_ssm.gdn_triton_bwd import rerun_forward
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
rel = lambda a, b: float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
NAMES = ("MCORE_SSM_GDN_BWD_SCRATCH", "MCORE_SSM_GDN_STATE_BWD", "MCORE_SSM_GDN_PAIRS_T")
CASES = ((12, 20, -1.0, True, {"MCORE_SSM_GDN_STATE_BWD": "v1"}), (80, 40, -30.0, True, {"MCORE_SSM_GDN_STATE_BWD": "v2"}),
         (80, 40, -1.0, False, {"MCORE_SSM_GDN_PAIRS_T": "saved"}))


def grads(args, probe, probe_s, states, options, env):
    for key in NAMES:
        os.environ.pop(key, None)
    os.environ.update(env)
    out, final = gated_delta_rule_triton(*args[:5], initial_state=args[5] if states else None, **options)
    for key in NAMES:
        os.environ.pop(key, None)  # the backward runs what the forward chose
    loss = (out.double() * probe).sum() + ((final.double() * probe_s).sum() if states else 0.0)
    return torch.autograd.grad(loss, args)


fp16, fp32, dtypes = [], [], []
for dk, dv, gate_min, states, extra in CASES:
    c = small_packed_case(dk, dv, gate_min)  # fp32
    q, k, v, gate, beta, cu, h0 = (c[n] for n in ("q", "k", "v", "gate", "beta", "cu", "h0"))
    probe, probe_s = c["probe"].double(), c["probe_s"].double()
    options = dict(cu_seqlens=cu, output_final_state=states)
    for dtype, errors in ((torch.float16, fp16), (torch.float32, fp32)):
        args = [t.to(dtype) if i < 3 else t for i, t in enumerate((q, k, v, gate, beta, h0))][: 6 if states else 5]
        args = [t.clone().requires_grad_() for t in args]
        exact = [t.detach().double().requires_grad_() for t in args]
        ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5] if states else None, **options)
        loss = (ref * probe).sum() + ((ref_final * probe_s).sum() if states else 0.0)
        want = torch.autograd.grad(loss, exact)
        default = grads(args, probe, probe_s, states, options, {**extra, "MCORE_SSM_GDN_BWD_SCRATCH": "fp32"})
        opt_in = grads(args, probe, probe_s, states, options, {**extra, "MCORE_SSM_GDN_BWD_SCRATCH": "inputs"})
        if dtype == torch.float32:  # the opt-in leaves fp32 inputs alone: the same bits
            errors += [float(not torch.equal(a, b)) for a, b in zip(opt_in, default)]
        errors += [rel(a, b) for a, b in zip(opt_in, want)] + [rel(a, b) for a, b in zip(opt_in, default)]
    # the rerun in the inputs' dtype: the scratch really is fp16, and near the fp32 rerun
    h = h0 if states else None
    launch = launch_for(q.half(), k.half(), v.half(), gate, beta, None, h, cu, None)
    inputs = (k.half(), v.half(), gate, beta, h)
    low = rerun_forward(launch, *inputs, "v2", dtype=torch.float16)
    full = rerun_forward(launch, *inputs, "v2")
    dtypes += [float(t.dtype != torch.float16) for t in low[:3]]
    fp16 += [rel(a, b) for a, b in zip(low[:3], full[:3])]
print(*fp16)
print(*fp32)
print(*dtypes)
"""


def _counts() -> tuple[int, int, int]:
    """How many numbers each line of ``INTERPRETED`` prints: fp16, fp32, rerun dtypes."""
    grads = 6 + 6 + 5  # per case: gradients with and without initial states
    return 2 * grads + 3 * 3, 3 * grads, 3 * 3


@pytest.mark.slow
def test_scratch_in_inputs_dtype_in_interpreter() -> None:
    """fp16 inputs, dk 12 and 80, packed documents, weak and -30 gates, with and without states, with the default
    and the v2 state walk and a saved ``T``: every gradient with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` within 1e-2 of
    the fp64 recurrence's and of the default backward's; the rerun's ``U``, states and ``W`` in fp16 within 1e-2 of
    the fp32 rerun's. fp32 inputs: the opt-in's gradients are the default's bits, within 1e-5 of fp64."""
    fp16, fp32, dtypes = _counts()
    numbers = run_interpreted(INTERPRETED, fp16 + fp32 + dtypes, timeout=900)
    half, full, kinds = numbers[:fp16], numbers[fp16 : fp16 + fp32], numbers[fp16 + fp32 :]
    assert all(e < 1e-2 for e in half), half
    # per case: 6 (or 5) "not equal" flags (0 or 1), then errors against fp64 and against the default
    assert all(e < 1e-5 for e in full), full
    assert kinds == [0.0] * dtypes, kinds


def test_scratch_choice_is_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_BWD_SCRATCH`` unset (or empty) picks ``inputs`` (the default since 2026-12-07), ``fp32`` fp32; anything else
    is a ``UserError`` naming the allowed values when a forward starts (``gdn_kernels_for``)."""
    from mcore.errors import UserError
    from mcore_ssm.kernel_choice import gdn_bwd_scratch, gdn_kernels_for

    monkeypatch.delenv(NAME, raising=False)
    assert gdn_bwd_scratch() == "inputs" and gdn_kernels_for(128).bwd_scratch == "inputs"
    monkeypatch.setenv(NAME, "")
    assert gdn_bwd_scratch() == "inputs"
    monkeypatch.setenv(NAME, "fp32")
    assert gdn_kernels_for(256).bwd_scratch == "fp32"
    monkeypatch.setenv(NAME, "bf16")
    with pytest.raises(UserError, match=f"{NAME} = 'bf16'; allowed: inputs, fp32"):
        gdn_kernels_for(128)


ENVS = ({"MCORE_SSM_GDN_STATE_BWD": "v1"}, {"MCORE_SSM_GDN_STATE_BWD": "v2"}, {"MCORE_SSM_GDN_PAIRS_T": "saved"})
OTHERS = ("MCORE_SSM_GDN_STATE_BWD", "MCORE_SSM_GDN_PAIRS_T")


def _grads(
    monkeypatch: pytest.MonkeyPatch,
    leaves: list[torch.Tensor],
    probes: tuple[torch.Tensor, torch.Tensor],
    env: dict[str, str],
    **options: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``<out, probe> + <final, probe_s>`` with the variables ``env`` set (and the others unset) when the
    forward starts."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    for name in (NAME, *OTHERS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out, final = gated_delta_rule_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True, **options)
    loss = (out.double() * probes[0]).sum() + (final.double() * probes[1]).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.gpu
@pytest.mark.parametrize("env", ENVS, ids=str)
def test_bf16_scratch_within_1e2_of_fp64_and_default(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """dk = dv = 128, two value heads per q/k head, bf16, packed documents with partial chunks, initial states and the
    final state's gradient (``bench_like_inputs``), with the default state walk, v2's, and a saved ``T``: every
    gradient with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` (the default) within 1e-2 of the fp64 torch chunked form's and of
    the fp32 scratch's, the same bits twice (no atomics)."""
    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)
    got = _grads(monkeypatch, leaves, probes, {**env, NAME: "inputs"}, cu_seqlens=cu)
    again = _grads(monkeypatch, leaves, probes, {**env, NAME: "inputs"}, cu_seqlens=cu)
    default = _grads(monkeypatch, leaves, probes, {**env, NAME: "fp32"}, cu_seqlens=cu)  # the fp32 scratch
    assert [t.dtype for t in got] == [t.dtype for t in leaves]
    for a, b, d, e in zip(got, again, default, want, strict=True):
        assert torch.equal(a, b)
        assert rel(a, e) < 1e-2 and rel(a, d) < 1e-2


@pytest.mark.gpu
def test_bf16_scratch_at_strong_gates_within_1e2_of_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 at dk = dv = 128 with gates down to -30 a token (``gate_min``), packed documents with initial states:
    every gradient with the opt-in within 1e-2 of the fp64 torch chunked form's (NaN fails in ``rel``)."""
    cu = torch.tensor([0, 7, 600, 1000, 1500, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16, gate_min=-30.0, seed=1)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)
    got = _grads(monkeypatch, leaves, probes, {NAME: "inputs"}, cu_seqlens=cu)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-2


@pytest.mark.gpu
def test_fp32_inputs_ignore_the_scratch_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 at dk = dv = 128 (the ieee path), gates down to -30: with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` every
    gradient is the default backward's (same bits) and within 1e-5 of the fp64 recurrence's."""
    leaves = bench_like_inputs(torch.float32, gate_min=-30.0)
    leaves = [t[:, :300].contiguous() if i < 5 else t[:2] for i, t in enumerate(leaves)]  # (2, 300): rows
    leaves = [t.requires_grad_() for t in leaves]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)
    got = _grads(monkeypatch, leaves, probes, {NAME: "inputs"})
    default = _grads(monkeypatch, leaves, probes, {NAME: "fp32"})
    for a, d, e in zip(got, default, want, strict=True):
        assert torch.equal(a, d) and rel(a, e) < 1e-5
