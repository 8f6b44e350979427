"""AdamW's one-pass Triton kernel (``adamw_triton``) and the clipping factor folded into the step (``step_scaled``).

CPU: the kernel in Triton's interpreter (a child process, ``TRITON_INTERPRET=1``, CUDA hidden) against the
``foreach`` reference of ``adamw_math`` over several steps: fp32 parameters (updated in place), bf16 parameters
with fp32 master weights (the bf16 copy within one bf16 step of the master: the interpreter truncates where the GPU
rounds; the GPU test checks the rounding exactly), a clipping factor,
sizes that end inside a block, a one-element and an empty tensor, parameters at different step counts; within
1e-6 of the reference (the kernel reads ``beta^t`` as ``exp2(t log2 beta)`` in fp32). In-process: ``AdamW``'s
``step_scaled`` on the torch paths equals clipping ``.grad`` and ``step()``, and ``impl`` errors. GPU (``-m gpu``):
``impl="triton"`` against ``impl="fused"`` with clipping on a bf16 model and an fp32 one.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
from helpers import SINGLE, batches, tiny_model

from mcore_optim.adamw import AdamWFactory
from mcore_optim.adamw_math import adamw_step
from mcore_testing.interpreted import interpreted_records

HYPER = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
SIZES = (5000, 2048, 1, 0, 4097)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if a.numel() else 0.0


def _case(low: bool, scaled: bool, seed: int, vectorized: bool = False) -> dict[str, Any]:
    """Four steps of the kernel and of the reference from the same state; the worst relative errors."""
    from mcore_optim.adamw_triton import adamw_step_triton
    from mcore_testing.interpreter_bounds import allowed

    g = torch.Generator().manual_seed(seed)
    masters = [torch.randn(n, generator=g) for n in SIZES]
    ref_w = [m.clone() for m in masters]
    ours_w = [m.clone() for m in masters]
    params = [m.to(torch.bfloat16) for m in masters] if low else None
    ours_m, ours_v = [torch.zeros(n) for n in SIZES], [torch.zeros(n) for n in SIZES]
    ref_m, ref_v = [torch.zeros(n) for n in SIZES], [torch.zeros(n) for n in SIZES]
    ours_t = [torch.tensor(float(i % 2)) for i in range(len(SIZES))]  # parameters at different step counts
    ref_t = [t.clone() for t in ours_t]
    worst = {"w": 0.0, "m": 0.0, "v": 0.0, "param_is_master_in_bf16": True}
    cache: dict[Any, Any] = {}  # the address tables, kept between steps as AdamW keeps them
    for step in range(4):
        if step == 2:  # a state tensor moved (e.g. loaded anew): the tables must follow it
            ours_w[0] = ours_w[0].clone()
        grads = [torch.randn(n, generator=g) * 3 for n in SIZES]
        if low:
            grads = [x.to(torch.bfloat16) for x in grads]
        scale = torch.tensor(0.37) if scaled else None
        with allowed(*ours_w, *grads, *ours_m, *ours_v, *ours_t, *(params or [])):  # reached through address tables
            adamw_step_triton(
                ours_w, grads, ours_m, ours_v, ours_t, list(params) if params else [None] * len(SIZES),
                grad_scale=scale, cache=cache, vectorized=vectorized, **HYPER,
            )  # fmt: skip
        wide = [x.float() for x in grads]
        if scale is not None:
            torch._foreach_mul_(wide, scale)
        adamw_step(ref_w, wide, ref_m, ref_v, ref_t, fused=False, **HYPER)
        for key, a, b in (("w", ours_w, ref_w), ("m", ours_m, ref_m), ("v", ours_v, ref_v)):
            worst[key] = max(worst[key], _rel(torch.cat(a), torch.cat(b)))  # over all parameters, as one vector
        if params:  # the interpreter truncates fp32 -> bf16 stores (the GPU rounds): within one bf16 step
            worst["param_is_master_in_bf16"] &= all(
                bool(((p.float() - w).abs() <= w.abs() * 2.0**-7).all()) for p, w in zip(params, ours_w, strict=True)
            )
    worst["steps_equal"] = all(torch.equal(a, b) for a, b in zip(ours_t, ref_t, strict=True))
    return worst


def _guarded_case() -> dict[str, Any]:
    """A bad step (``ok`` false) leaves every tensor as it was; a good one equals the unguarded step."""
    from mcore_optim.adamw_triton import adamw_step_triton
    from mcore_testing.interpreter_bounds import allowed

    g = torch.Generator().manual_seed(11)

    def state() -> list[list[torch.Tensor]]:
        w = [torch.randn(n, generator=g) for n in SIZES]
        return [w, [torch.randn(n, generator=g).abs() for n in SIZES], [torch.rand(n, generator=g) for n in SIZES],
                [torch.tensor(3.0) for _ in SIZES], [x.to(torch.bfloat16) for x in w]]  # fmt: skip

    grads = [torch.randn(n, generator=g).to(torch.bfloat16) for n in SIZES]
    guarded = state()
    before = [[x.clone() for x in part] for part in guarded]
    w, m, v, t, p = guarded
    with allowed(*grads, *w, *m, *v, *t, *p):  # reached through address tables
        adamw_step_triton(w, grads, m, v, t, list(p), grad_scale=torch.tensor(0.5), ok=torch.tensor(False), **HYPER)
    untouched = all(torch.equal(a, b) for part, old in zip(guarded, before) for a, b in zip(part, old))
    plain = [[x.clone() for x in part] for part in before]
    pw, pm, pv, pt, pp = plain
    with allowed(*grads, *w, *m, *v, *t, *p, *pw, *pm, *pv, *pt, *pp):
        adamw_step_triton(pw, grads, pm, pv, pt, list(pp), grad_scale=torch.tensor(0.5), **HYPER)
        adamw_step_triton(w, grads, m, v, t, list(p), grad_scale=torch.tensor(0.5), ok=torch.tensor(True), **HYPER)
    same = all(torch.equal(a, b) for part, other in zip(guarded, plain) for a, b in zip(part, other))
    return {"name": "guarded", "bad_step_untouched": untouched, "good_step_equals_unguarded": same}


def _chunked_case() -> dict[str, Any]:
    """A bf16 parameter that is a strided view of a packed buffer (an MoE gate: ``(E, F, H)`` in ``(E, 2, F, H)``,
    one table row per expert) beside a contiguous one: the same masters and moments as with contiguous copies, the
    view written where it lies (the buffer's other half, the up weights, untouched) and equal to its master in bf16
    exactly as the contiguous copy is (same kernel, same rounding)."""
    from mcore_optim.adamw_triton import adamw_step_triton, chunked_layout
    from mcore_testing.interpreter_bounds import allowed

    g = torch.Generator().manual_seed(21)
    e, f, h = 3, 40, 64  # runs of 2,560 elements: one whole block and a partial one each
    buffer = torch.randn(e, 2, f, h, generator=g).to(torch.bfloat16)
    gate, gate_before, up_before = buffer[:, 0], buffer[:, 0].clone(), buffer[:, 1].clone()
    other = torch.randn(700, generator=g).to(torch.bfloat16)
    results = []
    for target in (gate, gate_before.clone()):  # the view first: it updates the buffer in place
        masters = [gate_before.float(), other.float()]
        moments = [[torch.zeros_like(w) for w in masters] for _ in range(2)]
        steps = [torch.tensor(0.0), torch.tensor(0.0)]
        params = [target, other.clone()]
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            grads = [torch.randn(w.shape, generator=gen).to(torch.bfloat16) for w in masters]
            with allowed(buffer, *masters, *grads, *moments[0], *moments[1], *steps, *params):
                adamw_step_triton(masters, grads, moments[0], moments[1], steps, list(params), **HYPER)
        results.append((masters, moments, params))
    (w1, mo1, p1), (w2, mo2, p2) = results
    return {
        "name": "chunked",
        "layout": list(chunked_layout(gate) or ()),
        "masters_equal": all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True)),
        "moments_equal": all(torch.equal(a, b) for x, y in zip(mo1, mo2, strict=True) for a, b in zip(x, y)),
        "params_equal": torch.equal(p1[0], p2[0]) and torch.equal(p1[1], p2[1]),
        "moved": not torch.equal(p1[0], gate_before) and p1[0].data_ptr() == gate.data_ptr(),
        "up_untouched": torch.equal(buffer[:, 1], up_before),
    }


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    torch.set_num_threads(1)
    print(json.dumps(_guarded_case()))
    for low in (False, True):
        for scaled in (False, True):
            print(json.dumps({"name": f"low={low}-scaled={scaled}", **_case(low, scaled, seed=3 + 2 * low + scaled)}))
    print(json.dumps({"name": "vectorized", **_case(True, True, seed=9, vectorized=True)}))
    print(json.dumps(_chunked_case()))


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return interpreted_records(__file__)


@needs_triton
@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_matches_the_foreach_reference(records: dict[str, dict[str, Any]], low: bool, scaled: bool) -> None:
    r = records[f"low={low}-scaled={scaled}"]
    assert r["w"] < 1e-6 and r["m"] < 1e-6 and r["v"] < 1e-6, r  # NaN fails
    assert r["param_is_master_in_bf16"] and r["steps_equal"], r


@needs_triton
def test_vectorized_launch_matches_the_foreach_reference(records: dict[str, dict[str, Any]]) -> None:
    """``vectorized=True`` (whole blocks of aligned tensors through ``_block``'s hints; the interpreter runs the same
    code path, the hints are for the compiler) gives the reference's result too."""
    r = records["vectorized"]
    assert r["w"] < 1e-6 and r["m"] < 1e-6 and r["v"] < 1e-6, r
    assert r["param_is_master_in_bf16"] and r["steps_equal"], r


@needs_triton
@needs_triton
def test_kernel_writes_a_chunked_parameter_where_it_lies(records: dict[str, dict[str, Any]]) -> None:
    got = records["chunked"]
    assert got["layout"] == [3, 40 * 64, 2 * 40 * 64]
    assert got["masters_equal"] and got["moments_equal"] and got["params_equal"] and got["moved"], got
    assert got["up_untouched"], got


def test_vectorized_switch_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcore.errors import UserError
    from mcore_optim.adamw_triton import VECTORIZED_ENV, vectorized_from_env

    monkeypatch.delenv(VECTORIZED_ENV, raising=False)
    assert vectorized_from_env()  # the default since the H100 timing of 2026-12-07
    monkeypatch.setenv(VECTORIZED_ENV, "0")
    assert not vectorized_from_env()
    monkeypatch.setenv(VECTORIZED_ENV, "1")
    assert vectorized_from_env()
    monkeypatch.setenv(VECTORIZED_ENV, "yes")
    with pytest.raises(UserError, match=r"MCORE_OPTIM_ADAMW_VECTORIZED='yes'; allowed: 0 .* or 1") as info:
        vectorized_from_env()
    assert "\n" not in str(info.value)


@needs_triton
def test_a_guarded_bad_step_changes_nothing(records: dict[str, dict[str, Any]]) -> None:
    r = records["guarded"]
    assert r["bad_step_untouched"] and r["good_step_equals_unguarded"], r


def test_step_guarded_declines_off_the_triton_path() -> None:
    model = tiny_model()
    opt = AdamWFactory(AdamWFactory.Config(impl="foreach")).build(model, mesh=SINGLE, layouts=[])
    x, y = batches(1)[0]
    model(x, labels=y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step_guarded(torch.tensor(True), torch.tensor(0.5)) is False  # the loop then steps as before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(float(st["step"]) == 0 for st in opt.state.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_scaled_equals_clipping_the_grads_then_step(dtype: torch.dtype) -> None:
    """On the torch paths (here ``foreach``): the factor multiplies the (widened) gradients before the update.
    fp32: the same bits as clipping ``.grad`` over three steps. bf16: the moments of one step (Adam's update
    itself hardly sees a common factor) within bf16 rounding: widened then scaled rounds once less."""
    factory = AdamWFactory(AdamWFactory.Config(lr=1e-2, impl="foreach"))
    scaled_model, clipped_model = tiny_model().to(dtype), tiny_model().to(dtype)
    scaled = factory.build(scaled_model, mesh=SINGLE, layouts=[])
    clipped = factory.build(clipped_model, mesh=SINGLE, layouts=[])
    factor = torch.tensor(0.3)
    for x, y in batches(3 if dtype == torch.float32 else 1):
        for model in (scaled_model, clipped_model):
            model.zero_grad(set_to_none=True)
            model(x, labels=y).backward()
        torch._foreach_mul_([p.grad for p in clipped_model.parameters() if p.grad is not None], factor)
        scaled.step_scaled(factor)
        clipped.step()
    for (name, a), b in zip(scaled_model.named_parameters(), clipped_model.parameters(), strict=True):
        if dtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                assert _rel(scaled.state[name][key], clipped.state[name][key]) < 1e-2, (name, key)


def test_triton_impl_needs_cuda() -> None:
    factory = AdamWFactory(AdamWFactory.Config(impl="triton"))
    with pytest.raises(ValueError, match="impl = 'triton' needs CUDA"):
        factory.build(tiny_model(), mesh=SINGLE, layouts=[])
    assert not AdamWFactory(AdamWFactory.Config(impl="auto")).build(tiny_model(), mesh=SINGLE, layouts=[]).triton


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_impl_matches_fused_with_clipping_on_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore.train.grads import clip_factor, clip_grads_, global_grad_norm

    ours_model, ref_model = tiny_model().cuda().to(dtype), tiny_model().cuda().to(dtype)
    ours = AdamWFactory(AdamWFactory.Config(lr=3e-3, impl="auto")).build(ours_model, mesh=SINGLE, layouts=[])
    ref = AdamWFactory(AdamWFactory.Config(lr=3e-3, impl="fused")).build(ref_model, mesh=SINGLE, layouts=[])
    assert ours.triton and not ref.triton
    for x, y in batches(4):
        x, y = x.cuda(), y.cuda()
        for model in (ours_model, ref_model):
            model.zero_grad(set_to_none=True)
            model(x, labels=y).backward()
        ours.step_scaled(clip_factor(0.1, global_grad_norm(list(ours_model.parameters()))))
        clip_grads_(list(ref_model.parameters()), 0.1, global_grad_norm(list(ref_model.parameters())))
        ref.step()
    if dtype == torch.bfloat16:  # the kernel wrote each parameter as its master weight rounded to bf16
        for name, p in ours_model.named_parameters():
            assert torch.equal(p, ours.state[name]["master"].to(torch.bfloat16)), name
    start = dict(tiny_model().named_parameters())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        begin = start[name].detach().double().cuda()
        assert _rel(a.detach() - begin, b.detach() - begin) < tol, name  # the change the steps made


@pytest.mark.gpu
def test_step_guarded_on_cuda_skips_or_steps_on_the_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    guarded_model, scaled_model = tiny_model().cuda().bfloat16(), tiny_model().cuda().bfloat16()
    factory = AdamWFactory(AdamWFactory.Config(lr=3e-3))
    guarded = factory.build(guarded_model, mesh=SINGLE, layouts=[])
    scaled = factory.build(scaled_model, mesh=SINGLE, layouts=[])
    x, y = (t.cuda() for t in batches(1)[0])
    for model in (guarded_model, scaled_model):
        model(x, labels=y).backward()
    before = [p.detach().clone() for p in guarded_model.parameters()]
    factor = torch.tensor(0.5, device="cuda")
    assert guarded.step_guarded(torch.tensor(False, device="cuda"), factor)
    assert all(torch.equal(p, q) for p, q in zip(guarded_model.parameters(), before))
    assert all(float(st["step"]) == 0 for st in guarded.state.values())
    assert guarded.step_guarded(torch.tensor(True, device="cuda"), factor)
    scaled.step_scaled(factor)
    for (name, p), q in zip(guarded_model.named_parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(p, q), name


@needs_triton
def test_alignment_check_sees_views_into_buffers() -> None:
    """The vectorized path is taken only when every tensor starts on a 16-byte boundary: a view one fp32 element
    into a buffer does not."""
    from mcore_optim.adamw_triton import aligned

    buffer = torch.zeros(4096)
    assert aligned([buffer, buffer[4:]], [None])  # 16 bytes in
    assert not aligned([buffer, buffer[1:]])  # 4 bytes in
    assert not aligned([buffer.to(torch.bfloat16)[3:]])  # 6 bytes in


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "views-4-bytes-in"])
def test_kernel_on_cuda_matches_the_reference_for_aligned_and_unaligned_tensors(offset: int) -> None:
    """Every tensor a view ``offset`` elements into a buffer, ``vectorized=True``: the aligned launch (whole blocks
    loaded 16 bytes at a time) and the unaligned one (the alignment check falls back to scalar loads) both equal the
    ``foreach`` reference over three steps, bf16 gradients and parameters with fp32 masters, whole and partial
    blocks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore_optim.adamw_triton import adamw_step_triton

    sizes = (4096, 2048 * 3 + 5, 1, 2050)
    g = torch.Generator(device="cuda").manual_seed(5)

    def views(dtype: torch.dtype, fill: str) -> list[torch.Tensor]:
        out = []
        for n in sizes:
            buffer = torch.zeros(n + offset, device="cuda", dtype=dtype)
            if fill == "randn":
                buffer.normal_(generator=g)
            out.append(buffer[offset:])  # (n,)
        return out

    masters = views(torch.float32, "randn")
    ref_w = [w.clone() for w in masters]
    m, v = views(torch.float32, "zeros"), views(torch.float32, "zeros")
    ref_m, ref_v = [x.clone() for x in m], [x.clone() for x in v]
    params = views(torch.bfloat16, "zeros")
    steps = [torch.zeros((), device="cuda") for _ in sizes]
    ref_t = [t.clone() for t in steps]
    cache: dict[Any, Any] = {}
    for _ in range(3):
        grads = [x * 3 for x in views(torch.bfloat16, "randn")]
        adamw_step_triton(masters, grads, m, v, steps, list(params), cache=cache, vectorized=True, **HYPER)
        adamw_step(ref_w, [x.float() for x in grads], ref_m, ref_v, ref_t, fused=False, **HYPER)
    for name, a, b in (("w", masters, ref_w), ("m", m, ref_m), ("v", v, ref_v)):
        assert _rel(torch.cat(a), torch.cat(b)) < 1e-6, name  # NaN fails
    for p, w in zip(params, masters, strict=True):
        assert torch.equal(p, w.to(torch.bfloat16))  # rounded from the master, as the GPU rounds
