"""The blocks with the fused Triton conv and gated norm (``kernel_choice.fused_ops``) against ``MCORE_SSM_FUSED=0``.

CPU: in Triton's interpreter (a child process, ``mcore_testing.interpreted``, the bounds checker on), fp32, with the
Triton scans (``kernel = "triton"``): the ``gdn`` block's forward + backward (packed documents, a document shorter
than the conv, and plain rows) and the ``mamba2`` block's (packed, conv bias) with the fused ops equal to the same
block with ``MCORE_SSM_FUSED=0`` within 1e-5: the output, the input's gradient and every parameter's; the fused
kernels ran (three convs and one norm a GDN call, one and one a Mamba2 call) or not; a backward run after the
variable changed follows its forward's choice. In-process: where ``fused_ops`` says yes, and a bad value's one-line
``UserError``. GPU (``-m gpu``): the ``gdn`` block in bf16 at ``hybrid-bench``'s mixer shape, fused, no further from
the fp32 block than the unfused bf16 block is (x1.25 + 1e-3), its gradients too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from ssm_cases import needs_triton
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore_ssm.kernel_choice import fused_ops
from mcore_testing.interpreted import interpreted_records

ENV = "MCORE_SSM_FUSED"


@contextmanager
def _fused(value: str | None) -> Iterator[None]:
    """``MCORE_SSM_FUSED`` set to ``value`` (``None``: unset) inside the block."""
    old = os.environ.pop(ENV, None)
    if value is not None:
        os.environ[ENV] = value
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        if old is not None:
            os.environ[ENV] = old


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; NaN where either is not finite (NaN never passes)."""
    a, b = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fwd_bwd(
    block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, forward_env: str | None, backward_env: str | None
) -> list[torch.Tensor]:
    """``[out, d hidden, d every parameter]`` of one forward (under ``forward_env``) and backward (``backward_env``)."""
    leaf = hidden.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    with _fused(forward_env):
        out = block(leaf, ctx)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    with _fused(backward_env):
        (out.float() * probe.float()).sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
    return [out.detach(), leaf.grad, *grads]


def _counting() -> tuple[dict[str, int], Callable[[], None]]:
    """Wrap the fused entry points to count their calls; returns the counts and the restore."""
    import mcore_ssm.conv_triton as conv_triton
    import mcore_ssm.norm_triton as norm_triton

    counts = {"conv": 0, "norm": 0}
    conv, norm = conv_triton.conv1d_silu_train, norm_triton.gated_rms_norm_triton

    def conv_counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["conv"] += 1
        return conv(*args, **kwargs)

    def norm_counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["norm"] += 1
        return norm(*args, **kwargs)

    conv_triton.conv1d_silu_train, norm_triton.gated_rms_norm_triton = conv_counted, norm_counted

    def restore() -> None:
        conv_triton.conv1d_silu_train, norm_triton.gated_rms_norm_triton = conv, norm

    return counts, restore


def _block_record(name: str, block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> dict[str, Any]:
    counts, restore = _counting()
    fused = _fwd_bwd(block, hidden, ctx, None, None)
    fused_calls = dict(counts)
    unfused = _fwd_bwd(block, hidden, ctx, "0", "0")
    unfused_calls = {k: v - fused_calls[k] for k, v in counts.items()}
    late = _fwd_bwd(block, hidden, ctx, None, "0")  # the variable changes between forward and backward
    restore()
    return {
        "name": name,
        "count": len(fused),
        "rels": [_rel(a, b) for a, b in zip(fused, unfused, strict=True)],
        "late": [_rel(a, b) for a, b in zip(late, fused, strict=True)],
        "fused_calls": fused_calls,
        "unfused_calls": unfused_calls,
    }


def _gdn() -> nn.Module:
    from mcore_ssm.gdn import GatedDeltaNet

    cfg = GatedDeltaNet.Config(num_qk_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, kernel="triton")
    block = GatedDeltaNet(cfg, hidden_size=32)
    block.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        block.norm_weight.mul_(1 + 0.2 * torch.randn(block.norm_weight.shape, generator=torch.Generator()))
    return block


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    from mcore_ssm.mamba2 import Mamba2

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 40, 32, generator=gen)
    packed = BlockContext(cu_seqlens=torch.tensor([0, 2, 30, 40, 43, 80], dtype=torch.int32), max_seqlen=28)
    print(json.dumps(_block_record("gdn-packed", _gdn(), hidden, packed)))
    print(json.dumps(_block_record("gdn-rows", _gdn(), hidden, BlockContext())))
    torch.manual_seed(0)
    mamba = Mamba2(Mamba2.Config(d_state=16, headdim=16, ngroups=2, chunk_size=16, kernel="triton"), hidden_size=32)
    print(json.dumps(_block_record("mamba2-packed", mamba, hidden[:1], BlockContext(cu_seqlens=packed.cu_seqlens[:4]))))


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return interpreted_records(__file__)


@needs_triton
@pytest.mark.parametrize("name, calls", [("gdn-packed", 3), ("gdn-rows", 3), ("mamba2-packed", 1)])
def test_fused_block_equals_unfused_in_interpreter(records: dict[str, dict[str, Any]], name: str, calls: int) -> None:
    """Output, d(hidden) and every parameter's gradient within 1e-5; the fused kernels ran only when asked."""
    r = records[name]
    assert r["count"] >= 10, r  # out, d hidden, the parameters' gradients
    assert all(rel < 1e-5 for rel in r["rels"]), r
    assert r["fused_calls"] == {"conv": calls, "norm": 1} and r["unfused_calls"] == {"conv": 0, "norm": 0}, r


@needs_triton
@pytest.mark.parametrize("name", ["gdn-packed", "mamba2-packed"])
def test_backward_follows_the_forward_choice(records: dict[str, dict[str, Any]], name: str) -> None:
    """``MCORE_SSM_FUSED=0`` set after a fused forward: its backward still runs the fused kernels' (bitwise)."""
    assert all(rel == 0.0 for rel in records[name]["late"]), records[name]


def test_fused_ops_where_the_triton_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    x = torch.zeros(2, 3)
    assert fused_ops("triton", x) and not fused_ops("torch", x) and not fused_ops("auto", x)  # CPU: auto is torch
    assert not fused_ops("triton", x.double())  # fp64 keeps the torch ops
    monkeypatch.setenv(ENV, "0")
    assert not fused_ops("triton", x)
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(UserError, match=r"MCORE_SSM_FUSED = 'yes'; allowed: 1, 0") as info:
        fused_ops("triton", x)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_gdn_block_bf16_fused_no_further_from_fp32_than_unfused() -> None:
    """``hybrid-bench``'s mixer (hidden 2048, 8 q/k heads, 16 value heads of 128), B 2 x T 4096, 4 documents a row."""
    from mcore_ssm.gdn import GatedDeltaNet

    cfg = GatedDeltaNet.Config(num_qk_heads=8, num_v_heads=16, head_k_dim=128, head_v_dim=128)
    block = GatedDeltaNet(cfg, hidden_size=2048)
    block.reset_parameters(torch.Generator().manual_seed(0))
    cu = torch.arange(0, 2 * 4096 + 1, 1024, dtype=torch.int32, device="cuda")
    ctx = BlockContext(cu_seqlens=cu, max_seqlen=1024)
    hidden = torch.randn(2, 4096, 2048, generator=torch.Generator().manual_seed(1)).cuda()
    ref = _fwd_bwd(block.cuda(), hidden, ctx, "0", "0")  # fp32
    low = block.to(torch.bfloat16)
    fused = _fwd_bwd(low, hidden.bfloat16(), ctx, None, None)
    unfused = _fwd_bwd(low, hidden.bfloat16(), ctx, "0", "0")
    for i, (f, u, r) in enumerate(zip(fused, unfused, ref, strict=True)):
        assert _rel(f, r) <= 1.25 * _rel(u, r) + 1e-3, (i, _rel(f, r), _rel(u, r))
