"""The step's host syncs: the micro-batches' loss share and the gradients' finiteness stay on the device
(one ``float()`` per micro-batch stopped the host until the GPU caught up; the GPU then idled while the next
micro-batch was launched). The run loop reads them in its one all-reduce of the step, and hands a recipe whose
``update`` takes it the finiteness agreed over the ranks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from test_train_loop import make_config, make_corpus

from mcore.plugins import hookimpl
from mcore.precision.basic import FP32
from mcore.train import run
from mcore.train.microbatch import classify, forward_backward, forward_only
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyTransformer, tiny_batches
from mcore_testing.reference_optim import ReferenceAdamW


def _micro(device: str) -> list:
    return [(t.to(device), y.to(device), None) for t, y in tiny_batches(3, seed=2)]


def _run(device: str, model: torch.nn.Module | None = None, micro: list | None = None) -> tuple[torch.Tensor, ...]:
    """Forward/backward, finiteness and evaluation of ``model`` (a fresh one by default) on ``micro``."""
    model = TinyTransformer(seed=0).to(device) if model is None else model
    steps = classify([], [])
    micro = _micro(device) if micro is None else micro
    share = forward_backward(model, micro, steps, FP32())
    finite = FP32().unscale_grads(model)
    with torch.no_grad():
        evaluated = forward_only(model, micro, steps, FP32())
    return share, finite, evaluated


def test_loss_share_and_finiteness_are_device_tensors() -> None:
    share, finite, evaluated = _run("cpu")
    model = TinyTransformer(seed=0)
    want = sum(model(t, labels=y).detach().double() for t, y, _ in _micro("cpu")) / 3
    assert share.dtype == torch.float64 and share.shape == () and torch.allclose(share, want)
    assert finite.dtype == torch.bool and bool(finite) and torch.allclose(evaluated, want)


@pytest.mark.gpu
def test_forward_backward_and_finiteness_make_no_host_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, micro = TinyTransformer(seed=0).cuda(), _micro("cuda")  # copies from the host sync: not under test
    _run("cuda", model, micro)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        share, finite, _ = _run("cuda", model, micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert share.is_cuda and finite.is_cuda and bool(finite)


class AgreedUpdate(FP32):
    """fp32 whose ``update`` takes the step's agreed finiteness (what a loss-scaling recipe needs)."""

    name = "agreed-update"
    seen: ClassVar[list[bool]] = []

    def update(self, finite: bool | None = None) -> None:
        AgreedUpdate.seen.append(finite)  # type: ignore[arg-type]


class AgreedUpdatePlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("precision", "agreed-update", f"{__name__}:AgreedUpdate", summary="tests: update(finite=)")


def test_the_loop_hands_update_the_agreed_finiteness(tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", AgreedUpdatePlugin())
    AgreedUpdate.seen.clear()
    update = {"precision": {"recipe": "agreed-update"}, "train": {"steps": 2}}
    run(make_config(host, tmp_path / "run", make_corpus(tmp_path), update), host)
    assert AgreedUpdate.seen == [True, True]  # one call per step, with the all-reduced answer


def _old_clip(grads: list[torch.Tensor], max_norm: float, total: float) -> list[torch.Tensor]:
    """Clipping as the loop did it before it stayed on the device: the factor read on the host."""
    out = [g.clone() for g in grads]
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(out, coef)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_norm", [0.37, 1.0, 1e6])
def test_clipping_from_the_norm_tensor_equals_the_host_factor(dtype: torch.dtype, max_norm: float) -> None:
    from mcore.train.grads import clip_grads_, global_grad_norm

    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (1000, 37, 1)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype) * 3
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: skipped
    norm = global_grad_norm(params)
    want = _old_clip([p.grad for p in params[:3]], max_norm, float(norm))  # type: ignore[misc]
    clip_grads_(params, max_norm, norm)
    for p, w in zip(params[:3], want, strict=True):
        assert p.grad is not None and torch.equal(p.grad, w)  # the same bits, clipped or not


@pytest.mark.gpu
def test_clipping_fp32_gradients_makes_no_host_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore.train.grads import clip_grads_, global_grad_norm

    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (4096, 33)]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    clip_grads_(params, 1.0, global_grad_norm(params))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_grads_(params, 1.0, global_grad_norm(params))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    total = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
    assert abs(float(total) - 1.0) < 1e-4


@pytest.mark.parametrize("max_norm", [0.37, 1.0, 1e6])
def test_clip_factor_times_fp32_gradients_equals_clip_grads(max_norm: float) -> None:
    """What an optimizer taking the factor (``ScaledStep``) multiplies by is what ``clip_grads_`` does to fp32 grads."""
    from mcore.train.grads import clip_factor, clip_grads_, global_grad_norm

    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (777, 3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 2
    norm = global_grad_norm(params)
    factor = clip_factor(max_norm, norm)
    assert factor.dtype == torch.float32 and factor.shape == ()
    want = [p.grad * factor for p in params]  # type: ignore[operator]
    clip_grads_(params, max_norm, norm)
    for p, w in zip(params, want, strict=True):
        assert p.grad is not None and torch.equal(p.grad, w)


class RecordingAdamW(ReferenceAdamW):
    """``reference-adamw`` with the optional step methods named in ``methods`` (``step_scaled``: the clipping factor
    taken into the step, ``ScaledStep``; ``step_guarded``: the update guarded by the device's decision, read here
    on the host as a stand-in for a device-side skip, ``GuardedStep``), recording what each call received."""

    methods: ClassVar[tuple[str, ...]] = ()
    seen: ClassVar[list[float]] = []  # each call's factor (step_scaled) or decision (step_guarded)
    plain_steps: ClassVar[int] = 0

    def build(self, model: Any, *, mesh: Any, layouts: Any) -> Any:
        opt, cls = super().build(model, mesh=mesh, layouts=layouts), type(self)

        def scale(grad_scale: torch.Tensor | None) -> None:
            if grad_scale is not None:
                torch._foreach_mul_([p.grad for p in opt.params if p.grad is not None], grad_scale)

        def step_scaled(grad_scale: torch.Tensor) -> None:
            cls.seen.append(float(grad_scale))
            scale(grad_scale)
            opt.inner.step()

        def step_guarded(ok: torch.Tensor, grad_scale: torch.Tensor | None = None) -> bool:
            assert ok.dtype == torch.bool and ok.shape == ()
            cls.seen.append(float(ok))
            if bool(ok):
                scale(grad_scale)
                opt.inner.step()
            return True

        def step() -> None:
            cls.plain_steps += 1
            opt.inner.step()

        opt.step = step
        for name, method in (("step_scaled", step_scaled), ("step_guarded", step_guarded)):
            if name in cls.methods:
                setattr(opt, name, method)
        return opt

    @classmethod
    def reset(cls) -> None:
        cls.seen, cls.plain_steps = [], 0


class ScaledAdamW(RecordingAdamW):
    methods = ("step_scaled",)


class GuardedAdamW(RecordingAdamW):
    methods = ("step_guarded",)


class RecordingPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("optimizer", "scaled-adamw", ScaledAdamW, summary="tests: clipping folded into the step")
        registry.add("optimizer", "guarded-adamw", GuardedAdamW, summary="tests: a device-guarded update")


def test_an_optimizer_taking_the_clip_factor_gets_it_instead_of_clipped_grads(tmp_path: Path) -> None:
    from mcore.observe.metrics import read_metrics

    host = isolated_host("mcore_testing.plugin", RecordingPlugin())
    corpus = make_corpus(tmp_path)
    ScaledAdamW.reset()
    losses = {}
    for name in ("reference-adamw", "scaled-adamw"):
        update = {"optimizer": {"name": name}, "train": {"steps": 3, "grad_clip": 0.05}, "log": {"every": 1}}
        run(make_config(host, tmp_path / name, corpus, update), host)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        losses[name] = [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert ScaledAdamW.plain_steps == 0 and len(ScaledAdamW.seen) == 3
    norms = [n for _, n in losses["scaled-adamw"]]
    assert all(0 < f < 1 for f in ScaledAdamW.seen)  # clipping was active
    for f, n in zip(ScaledAdamW.seen, norms, strict=True):
        assert abs(f - 0.05 / (n + 1e-6)) <= 1e-6 * f
    assert losses["scaled-adamw"] == losses["reference-adamw"]  # the same run, bit for bit


@pytest.mark.parametrize(
    "case", ["nan", "spike"], ids=["nan-skip", "spike-skip"]
)  # step 3 NaN (2 micro-batches a step) / step 4 spiked x 10
def test_a_guarded_update_is_queued_first_and_follows_the_same_verdicts(tmp_path: Path, case: str) -> None:
    from test_train_loop import NaNAt

    from mcore.observe.metrics import read_metrics

    bad = NaNAt({5, 6}) if case == "nan" else NaNAt({7, 8}, factor=10.0)
    host = isolated_host("mcore_testing.plugin", bad, RecordingPlugin())
    corpus = make_corpus(tmp_path)
    GuardedAdamW.reset()
    train = {"grad_clip": 0.05, "spike_factor": 3.0, "spike_warmup_steps": 2}
    rows = {}
    for name in ("reference-adamw", "guarded-adamw"):
        update = {"model": {"name": "nan-tiny"}, "optimizer": {"name": name}, "train": train, "log": {"every": 1}}
        with pytest.warns(RuntimeWarning, match="skipped"):
            run(make_config(host, tmp_path / name, corpus, update), host)
        rows[name] = [
            (r["loss"], r["skipped"], r.get("problem")) for r in read_metrics(tmp_path / name / "metrics.jsonl")
        ]
    bad_step = 3 if case == "nan" else 4
    assert GuardedAdamW.seen == [float(s != bad_step) for s in range(1, 7)] and GuardedAdamW.plain_steps == 0
    assert str(rows["guarded-adamw"]) == str(rows["reference-adamw"])  # the same run (NaN compared as text)
    assert [skipped for _, skipped, _ in rows["guarded-adamw"]] == [s == bad_step for s in range(1, 7)]


def test_the_device_verdict_mirrors_the_host_verdict() -> None:
    from mcore.train.health import Health

    losses = [0.0, 1.0, 2.9999999, 3.0, 3.0000001, 30.0, math.inf, -math.inf, math.nan]
    for ema, good_steps in [(None, 0), (1.0, 1), (1.0, 2), (1.0, 5)]:
        for factor in (0.0, 3.0):
            health = Health(spike_factor=factor, spike_warmup_steps=2, max_skipped=3, ema=ema, good_steps=good_steps)
            for loss in losses:
                for bad_ranks in (0.0, 1.0):
                    want = health.verdict(loss, bad_ranks == 0) is None
                    got = health.device_ok(torch.tensor(loss, dtype=torch.float64), torch.tensor(bad_ranks).double())
                    assert got.dtype == torch.bool and bool(got) == want, (loss, bad_ranks, ema, good_steps, factor)


def test_read_later_returns_the_values_on_cpu() -> None:
    from mcore.train.loop import read_later

    values = torch.tensor([1.5, 0.0, float("nan")], dtype=torch.float64)
    read = read_later(values)
    values.zero_()  # on the host the values are read when asked
    assert read() == [0.0, 0.0, 0.0]


@pytest.mark.gpu
def test_read_later_does_not_wait_for_work_queued_after_it() -> None:
    """The step's verdict is copied out before the update is queued: reading it waits for the copy, not for the
    update (the GPU keeps working while the host reads, logs and queues the next step)."""
    from mcore.train.loop import read_later

    values = torch.tensor([3.0, 1.0, float("inf")], device="cuda", dtype=torch.float64)
    read = read_later(values)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued after the copy: the "update"
    values.fill_(-1.0)  # queued after the sleep: not what the copy saw
    got = read()
    busy = not torch.cuda.current_stream().query()  # the sleep still runs: the read did not wait for it
    torch.cuda.synchronize()
    assert got == [3.0, 1.0, math.inf]
    assert busy
