"""The fused expert paths against the unfused references: one gate-and-up grouped GEMM, the SwiGLU on its output,
the permute and combine by the known permutation (CPU here; their CUDA runs under ``-m gpu``).

CPU: ``torch._grouped_mm`` takes fp32 on the CPU, so the one-GEMM autograd function (``gate_up_grouped_mm``) is
checked here against a float64 per-expert reference (forward and every gradient, an expert with no rows, padding
rows); ``GroupedSwiGLU.forward`` against ``forward_reference`` (two GEMMs, torch ``silu(gate) * up``), plain and
clamped. GPU: the same with the Triton kernels and ``torch._grouped_mm`` in bf16 (< 1e-2) and the block in fp32
on CUDA against the CPU (< 1e-5). The kernels' CPU checks run in Triton's interpreter (``test_fused_interpreted``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore.errors import ConfigError
from mcore.precision.grouped import grouped_linear_reference
from mcore.protocols import AuxLosses, BlockContext, RoutingDecision
from mcore_moe.block import DISPATCHERS, MoE, MoEConfig
from mcore_moe.experts import GroupedSwiGLU
from mcore_moe.gate_up import gate_up_linear
from mcore_moe.hf_map import MoEHF
from mcore_moe.kernel_choice import use_triton
from mcore_moe.swiglu import swiglu, swiglu_reference
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

SIZES = [5, 0, 9, 2]  # an expert with no rows; 18 rows in all, the last 2 padding


def _gate_up_case(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    x = seeded_randn(18, 16, seed=1, dtype=dtype, device=device).requires_grad_()
    gate = seeded_randn(4, 8, 16, seed=2, dtype=dtype, device=device, scale=0.2).requires_grad_()
    up = seeded_randn(4, 8, 16, seed=3, dtype=dtype, device=device, scale=0.2).requires_grad_()
    return x, gate, up, torch.tensor(SIZES, device=device)


def _float64_gate_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """The real rows' ``[gate | up]`` outputs and the gradients of x, gate, up for a fixed output gradient."""
    x64, g64, u64 = (t.detach().cpu().double().requires_grad_() for t in (x, gate, up))
    out = torch.cat(
        [grouped_linear_reference(x64, g64, sizes.cpu()), grouped_linear_reference(x64, u64, sizes.cpu())], 1
    )
    out[:16].backward(seeded_randn(16, 16, seed=4).double())
    return [out[:16], x64.grad[:16], g64.grad, u64.grad]  # type: ignore[index,list-item]


@pytest.mark.parametrize("one_mm", [True, False], ids=["grouped_mm", "reference"])
def test_one_gate_up_gemm_matches_two_in_float64(one_mm: bool) -> None:
    x, gate, up, sizes = _gate_up_case(torch.float32)
    out = gate_up_linear(x, gate, up, sizes, grouped_mm=one_mm)  # (18, 16) = (M, 2F)
    assert out.shape == (18, 16)
    out[:16].backward(seeded_randn(16, 16, seed=4))
    assert x.grad is not None and gate.grad is not None and up.grad is not None
    got_all = [out[:16], x.grad[:16], gate.grad, up.grad]
    for name, got, ref in zip(("out", "d x", "d gate", "d up"), got_all, _float64_gate_up(x, gate, up, sizes)):
        assert_rel_close(got, ref.float(), 1e-5, name=name)
    assert gate.grad is not None and torch.equal(gate.grad[1], torch.zeros(8, 16))  # no rows: no gradient


@pytest.mark.parametrize("limit", [None, 0.3])
def test_grouped_swiglu_forward_equals_the_unfused_reference(limit: float | None) -> None:
    def run(fused: bool) -> list[torch.Tensor]:
        experts = GroupedSwiGLU(4, 16, 8, swiglu_limit=limit)
        for i, p in enumerate(experts.parameters()):
            p.data = seeded_randn(*p.shape, seed=10 + i, scale=0.3)
        rows = seeded_randn(16, 16, seed=5).requires_grad_()
        sizes = torch.tensor([5, 0, 9, 2])
        out = (experts if fused else experts.forward_reference)(rows, sizes)
        out.backward(seeded_randn(16, 16, seed=6))
        return [out, rows.grad, *(p.grad for p in experts.parameters())]  # type: ignore[list-item]

    for got, ref in zip(run(True), run(False)):
        assert_rel_close(got, ref, 1e-5)


def test_swiglu_reference_is_silu_gate_times_up_and_clamps() -> None:
    x = seeded_randn(7, 12, seed=7) * 2
    gate, up = x[:, :6], x[:, 6:]
    assert torch.equal(swiglu(x, kernel="torch"), torch.nn.functional.silu(gate) * up)
    clamped = swiglu_reference(x, 0.5)
    assert torch.equal(clamped, torch.nn.functional.silu(gate.clamp(max=0.5)) * up.clamp(-0.5, 0.5))


def test_bad_kernel_and_odd_features_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="moe: kernel = 'cuda'; allowed: auto, torch, triton"):
        use_triton(torch.zeros(1), "cuda")
    with pytest.raises(ValueError, match="swiglu input has 5 features; must be even"):
        swiglu(torch.zeros(2, 5))
    assert not use_triton(torch.zeros(1))  # CPU tensors take the torch path


@pytest.mark.parametrize("limit", [0, -1.0, True, "7"])
def test_swiglu_limit_must_be_positive(limit: Any) -> None:
    with pytest.raises(ConfigError, match=f"model.moe.swiglu_limit = {limit!r}: must be a number > 0"):
        MoEConfig(num_experts=4, top_k=2, swiglu_limit=limit)


def test_hugging_face_export_refuses_a_clamped_swiglu() -> None:
    with pytest.raises(ValueError, match=r"moe\.swiglu_limit = 7\.0 \(qwen3_moe experts are plain SwiGLU"):
        MoEHF().config_to_hf(MoEConfig(num_experts=4, top_k=2, swiglu_limit=7.0), "qwen3_moe")


# -- CUDA ------------------------------------------------------------------------------------------------------------


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("limit", [None, 1.0])
def test_cuda_experts_fused_bf16_match_the_unfused_reference(limit: float | None) -> None:
    """One ``torch._grouped_mm`` for gate and up, the Triton SwiGLU: output and every gradient within 1e-2 of the
    unfused bf16 path (two ``torch._grouped_mm``, torch ``silu(gate) * up``)."""
    _cuda()
    g = seeded_generator(0)
    sizes = torch.tensor([300, 0, 17, 700, 5, 2], device="cuda")  # rows past 1024: padding

    def run(fused: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        experts = GroupedSwiGLU(6, 256, 128, swiglu_limit=limit)
        for i, p in enumerate(experts.parameters()):
            p.data = seeded_randn(*p.shape, seed=20 + i, scale=0.06)
        experts = experts.to("cuda", dtype)
        rows = seeded_randn(1100, 256, seed=21).to("cuda", dtype).requires_grad_()
        out = (experts if fused else experts.forward_reference)(rows, sizes)[:1024]
        out.backward(torch.randn(1024, 256, generator=g).to("cuda", dtype))
        return [out, rows.grad[:1024], *(p.grad for p in experts.parameters())]  # type: ignore[index,list-item]

    g.manual_seed(0)
    fused = run(True, torch.bfloat16)
    g.manual_seed(0)
    unfused = run(False, torch.bfloat16)
    for got, ref in zip(fused, unfused):
        assert_rel_close(got.float(), ref.float(), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DISPATCHERS))
@pytest.mark.parametrize("kw", [{}, {"swiglu_limit": 0.05, "capacity_factor": 1.0}, {"chunk_tokens": 50}])
def test_cuda_block_fp32_matches_the_torch_path(name: str, kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``moe`` block on CUDA in fp32 with the Triton SwiGLU, permute and combine against the same block with
    them off (the torch references, same device: same routing), within 1e-5."""
    _cuda()
    import mcore_moe.dispatcher
    import mcore_moe.swiglu

    config = MoEConfig(num_experts=8, top_k=3, moe_ffn_hidden_size=48, num_shared_experts=1, dispatcher=name, **kw)

    def run(fused: bool) -> list[torch.Tensor]:
        assert use_triton(torch.zeros(1, device="cuda"))  # Triton imports: auto takes it
        for module in (mcore_moe.dispatcher, mcore_moe.swiglu):
            monkeypatch.setattr(module, "use_triton", lambda x, kernel="auto": fused)
        block = MoE(config, hidden_size=64)
        block.reset_parameters(seeded_generator(1))
        block = block.to("cuda")
        x = seeded_randn(3, 70, 64, seed=2).to("cuda").requires_grad_()
        out = block(x, BlockContext(aux_losses=AuxLosses()))
        out.backward(seeded_randn(3, 70, 64, seed=3).to("cuda"))
        monkeypatch.undo()
        return [out, x.grad, *(p.grad for p in block.parameters())]  # type: ignore[list-item]

    fused, reference = run(True), run(False)
    assert len(fused) == len(reference) == 9
    for got, ref in zip(fused, reference):
        assert_rel_close(got, ref, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DISPATCHERS))
def test_cuda_permute_and_combine_are_deterministic_and_match_bf16(name: str) -> None:
    """Permute + combine by the permutation on CUDA in bf16: within 1e-2 of the CPU fp32 reference, bitwise the
    same gradients on a second run."""
    _cuda()
    n, h, e, k = 4096, 512, 16, 4
    g = seeded_generator(3)
    experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    experts[::7, -1] = -1  # dropped slots
    weights = torch.rand(n, k, generator=g)
    hidden, grad = seeded_randn(n, h, seed=4), seeded_randn(n, h, seed=5)

    def run(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
        x = hidden.to(device, dtype).requires_grad_()
        w = weights.to(device).requires_grad_()
        dispatcher = DISPATCHERS[name](None, e)
        result = dispatcher.dispatch(x, RoutingDecision(experts=experts.to(device), weights=w, num_experts=e))
        out = dispatcher.combine(torch.tanh(result.tokens) + result.tokens, result)
        out.backward(grad.to(device, dtype))
        return [out, x.grad, w.grad]  # type: ignore[list-item]

    first, again = run("cuda", torch.bfloat16), run("cuda", torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for got, ref in zip(first, run("cpu", torch.float32)):
        assert_rel_close(got.float().cpu(), ref, 1e-2)
