"""The ``gdn`` block (``mcore_ssm.gdn``): against the issue's formula composed from plain ops, packed documents,
prefill + decode, the inference-cache path, the head split of tensor parallelism, declarations and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mcore.params import collect_param_specs
from mcore.protocols.block import BlockContext, FlopsShape, RecurrentStateSpec
from mcore_ssm.block_utils import PerChannel
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.hosts import isolated_host
from mcore_testing.reference_kv import ReferenceKVCache

HIDDEN = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(dtype=torch.float64, seed=0, **kw) -> GatedDeltaNet:
    cfg = GatedDeltaNet.Config(**{"num_qk_heads": 2, "num_v_heads": 4, "head_k_dim": 4, "head_v_dim": 3, **kw})
    block = GatedDeltaNet(cfg, hidden_size=HIDDEN)
    block.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norm scale, conv and out bias-free weights already random
        block.norm_weight.add_(torch.randn(block.norm_weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return block.to(dtype)


def by_formula(block: GatedDeltaNet, hidden: torch.Tensor) -> torch.Tensor:
    """The block's math from plain torch ops and the token recurrence (one row = one sequence)."""
    dk, dv = block.head_k_dim, block.head_v_dim
    width = block.config.conv_kernel

    def conv(x, weight):  # (B, T, C) causal depthwise conv + SiLU via nn.functional.conv1d
        padded = F.pad(x.transpose(1, 2), (width - 1, 0))
        return F.silu(F.conv1d(padded, weight[:, None], groups=x.shape[-1])).transpose(1, 2)

    q = conv(hidden @ block.q.weight.T, block.conv_q.weight).unflatten(-1, (-1, dk))
    k = conv(hidden @ block.k.weight.T, block.conv_k.weight).unflatten(-1, (-1, dk))
    v = conv(hidden @ block.v.weight.T, block.conv_v.weight).unflatten(-1, (-1, dv))
    q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()  # Qwen3-Next's / fla's l2norm, eps 1e-6
    k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    beta = torch.sigmoid(hidden @ block.b.weight.T)
    g = -block.A_log.weight[:, 0].exp() * F.softplus(hidden @ block.a.weight.T + block.a.bias)
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta, scale=dk**-0.5)  # (B, T, hv, dv)
    z = (hidden @ block.z.weight.T).unflatten(-1, (-1, dv))
    normed = o / (o.pow(2).mean(-1, keepdim=True) + block.config.norm_eps).sqrt() * block.norm_weight
    return (normed * F.silu(z)).flatten(-2) @ block.out.weight.T


def test_block_equals_formula():
    block = make(chunk_size=8)
    hidden = torch.randn(2, 21, HIDDEN, dtype=torch.float64)
    out = block(hidden, BlockContext())
    assert out.shape == hidden.shape
    assert rel(out, by_formula(block, hidden)) < 1e-12


def test_packed_equals_each_document_alone_with_gradients():
    block = make(chunk_size=4)
    hidden = torch.randn(2, 12, HIDDEN, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 15, 24], dtype=torch.int32)  # document 2 continues into row 1: restarts there
    out = block(hidden, BlockContext(cu_seqlens=cu, max_seqlen=9))
    pieces = [(0, 5), (5, 6), (6, 12), (12, 15), (15, 24)]
    flat = hidden.reshape(24, HIDDEN)
    ref = torch.cat([block(flat[None, lo:hi], BlockContext())[0] for lo, hi in pieces]).view(2, 12, HIDDEN)
    assert rel(out, ref) < 1e-12
    probe = torch.randn_like(out)
    params = [p for p in block.parameters()]
    got = torch.autograd.grad((out * probe).sum(), [hidden, *params])
    want = torch.autograd.grad((ref * probe).sum(), [hidden, *params])
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-10


def test_prefill_then_decode_equals_full_forward():
    block = make(dtype=torch.float32, chunk_size=8)
    hidden = torch.randn(3, 20, HIDDEN)
    full = block(hidden, BlockContext())
    with torch.no_grad():
        out, state = block.forward_with_state(hidden[:, :13], BlockContext(), None)
        outs = [out]
        for t in range(13, 20):
            step, state = block.step(hidden[:, t], state)
            outs.append(step[:, None])
    assert rel(torch.cat(outs, 1), full) < 1e-5
    assert {n: (tuple(t.shape[1:]), t.dtype) for n, t in state.items()} == block.state_shapes()


def test_packed_prefill_then_decode_of_two_sequences():
    """An engine-like step: two prompts packed in one row (cu_seqlens), then one token of each per step."""
    block = make(chunk_size=4)
    seqs = [torch.randn(9, HIDDEN, dtype=torch.float64), torch.randn(6, HIDDEN, dtype=torch.float64)]
    prompt = [5, 2]
    packed = torch.cat([s[:n] for s, n in zip(seqs, prompt, strict=True)])[None]  # (1, 7, H)
    cu = torch.tensor([0, 5, 7], dtype=torch.int32)
    out, state = block.forward_with_state(packed, BlockContext(cu_seqlens=cu), block.zero_state(2))
    got = [[out[0, :5]], [out[0, 5:]]]
    for t in range(4):
        tokens = torch.stack([seqs[0][5 + t], seqs[1][2 + t]])  # (2, H)
        step, state = block.step(tokens, state)
        got[0].append(step[:1])
        got[1].append(step[1:])
    for i, n in enumerate((9, 6)):
        ref = block(seqs[i][None, :n], BlockContext())[0]
        assert rel(torch.cat(got[i]), ref) < 1e-10


def test_forward_under_inference_cache():
    """The engine's reference cache (``mcore_testing.reference_kv``): prefill, decode and mixed steps of two
    sequences packed in one row, their order changing, equal each sequence's full forward."""
    block = make(dtype=torch.float32, chunk_size=4)
    cache = ReferenceKVCache({2: block.cache_spec()}, max_seqs=4)
    seqs = {10: torch.randn(1, 9, HIDDEN), 11: torch.randn(1, 6, HIDDEN)}
    done = {10: 0, 11: 0}
    got: dict[int, list[torch.Tensor]] = {10: [], 11: []}
    with torch.no_grad():
        for plan in ({10: 5, 11: 3}, {10: 1, 11: 1}, {11: 2, 10: 1}, {10: 2}):
            ids, counts = list(plan), list(plan.values())
            cache.schedule(ids, counts)
            step = torch.cat([seqs[i][:, done[i] : done[i] + n] for i, n in plan.items()], dim=1)  # (1, N, H)
            cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            ctx = BlockContext(cu_seqlens=cu, max_seqlen=max(counts), kv_cache=cache, layer_index=2)
            out = block(step, ctx)
            for (i, n), lo in zip(plan.items(), cu[:-1].tolist(), strict=False):
                got[i].append(out[:, lo : lo + n])
                done[i] += n
        for i, x in seqs.items():
            assert rel(torch.cat(got[i], dim=1), block(x, BlockContext())) < 1e-5


class TestGatedDeltaNetConformance(BlockConformance):
    hidden_size = HIDDEN
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> GatedDeltaNet:
        cfg = GatedDeltaNet.Config(num_qk_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=4, chunk_size=4)
        return GatedDeltaNet(cfg, hidden_size=hidden_size)


def test_head_split_of_tensor_parallelism():
    """Two 'ranks' holding halves of the heads (rows of every column parameter, columns of ``out``) sum to
    the whole block's output: what the ``tp`` layout's declared column/row/partial plan computes."""
    block = make(chunk_size=8)
    hidden = torch.randn(2, 10, HIDDEN, dtype=torch.float64)
    full = block(hidden, BlockContext())
    specs = collect_param_specs(block)
    total = torch.zeros_like(full)
    for rank in range(2):
        part = GatedDeltaNet(
            GatedDeltaNet.Config(num_qk_heads=1, num_v_heads=2, head_k_dim=4, head_v_dim=3, chunk_size=8),
            hidden_size=HIDDEN,
        ).to(torch.float64)
        with torch.no_grad():
            for name, param in block.named_parameters():
                target = part.get_parameter(name)
                style = specs[name].tp
                if style == "column":
                    target.copy_(param.chunk(2, 0)[rank])
                elif style == "row":
                    target.copy_(param.chunk(2, 1)[rank])
                else:
                    target.copy_(param)
        total = total + part(hidden, BlockContext())
    assert rel(total, full) < 1e-12


def test_head_slices_when_ranks_outnumber_qk_heads():
    """tp = 4 with 2 query/key heads: each rank keeps the q/k projections and filters whole and uses the rows of
    its value head's query/key head (``rows``, as the layout sets them), and 1 of the 4 value heads."""
    block = make(chunk_size=8)
    hidden = torch.randn(2, 10, HIDDEN, dtype=torch.float64)
    full = block(hidden, BlockContext())
    specs = collect_param_specs(block)
    total = torch.zeros_like(full)
    dk = block.head_k_dim
    for rank in range(4):
        cfg = GatedDeltaNet.Config(num_qk_heads=1, num_v_heads=1, head_k_dim=4, head_v_dim=3, chunk_size=8)
        part = GatedDeltaNet(cfg, hidden_size=HIDDEN).to(torch.float64)
        head = rank // 2  # the query/key head of value head `rank`
        with torch.no_grad():
            for name in ("conv_q", "conv_k"):  # whole filters, this rank's rows selected
                whole = PerChannel(2 * dk, block.config.conv_kernel).to(torch.float64)
                whole.weight.copy_(getattr(block, name).weight)
                whole.rows = (head * dk, (head + 1) * dk)
                setattr(part, name, whole)
            for name, param in block.named_parameters():
                target = part.get_parameter(name)
                if name.split(".")[0] in ("q", "k"):  # a head-sliced projection computes its head's rows
                    target.copy_(param[head * dk : (head + 1) * dk])
                elif name.split(".")[0] in ("conv_q", "conv_k"):
                    continue
                elif specs[name].tp == "column":
                    target.copy_(param.chunk(4, 0)[rank])
                elif specs[name].tp == "row":
                    target.copy_(param.chunk(4, 1)[rank])
                else:
                    target.copy_(param)
        total = total + part(hidden, BlockContext())
    assert rel(total, full) < 1e-12


def test_declarations_state_and_flops():
    block = make(dtype=torch.float32)
    specs = collect_param_specs(block)
    assert set(specs) == {n for n, _ in block.named_parameters()}
    assert all(spec.init is not None and spec.tp is not None for spec in specs.values())
    assert specs["out.weight"].tp == "row" and specs["norm_weight"].tp == "partial"
    fresh = GatedDeltaNet(GatedDeltaNet.Config(num_qk_heads=2, num_v_heads=4, head_k_dim=4), hidden_size=HIDDEN)
    assert torch.equal(fresh.a.bias, torch.ones(4)) and torch.equal(fresh.norm_weight, torch.ones(4))
    a = fresh.A_log.weight.exp()
    assert bool(((a >= 1) & (a <= 16)).all())
    assert fresh.conv_q.weight.abs().max() <= 0.5
    spec = block.cache_spec()
    assert isinstance(spec, RecurrentStateSpec)
    assert spec.states["ssm"] == ((4, 4, 3), torch.float32) and spec.states["conv_v"] == ((12, 3), torch.float32)
    assert block.num_parameters() == sum(p.numel() for p in block.parameters())
    assert block.flops(FlopsShape(tokens=10, attended=55)) > 2 * 10 * HIDDEN * (8 + 8 + 12 + 12 + 4 + 4 + 12)


def test_bf16_close_to_fp32():
    block = make(dtype=torch.float32)
    hidden = torch.randn(2, 70, HIDDEN)
    ref = block(hidden, BlockContext())
    out = block.to(torch.bfloat16)(hidden.bfloat16(), BlockContext())
    assert out.dtype == torch.bfloat16 and rel(out.float(), ref) < 3e-2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_qk_heads": 0}, "num_qk_heads = 0"),
        ({"num_qk_heads": 3, "num_v_heads": 4}, "num_v_heads = 4"),
        ({"conv_kernel": 1}, "conv_kernel = 1"),
        ({"norm_eps": math.nan}, "norm_eps"),
        ({"head_k_dim": -2}, "head_k_dim"),
        ({"chunk_size": True}, "chunk_size"),
    ],
)
def test_bad_config_is_one_line(kw, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNet.Config(**kw)


def test_hidden_not_divisible_names_key():
    with pytest.raises(ValueError, match="num_v_heads = 3"):
        GatedDeltaNet(GatedDeltaNet.Config(num_qk_heads=3), hidden_size=16)


def test_registered_as_block():
    host = isolated_host("mcore_ssm.plugin", builtins=False)
    assert host.load("block", "gdn") is GatedDeltaNet
