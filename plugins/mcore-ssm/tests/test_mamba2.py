"""The ``mamba2`` block: conformance, against a plain fp64 composition of its parts, packed documents,
state carried through chunked prefill and decode (by hand and through an inference cache), the declared
tensor-parallel split, initialisation and config errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mcore.construct import init_params
from mcore.params import collect_param_specs
from mcore.protocols.block import BlockContext, BlockShared, RecurrentStateSpec
from mcore_ssm.mamba2 import Mamba2
from mcore_ssm.mamba2_reference import ssd_sequential
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.hosts import isolated_host
from mcore_testing.reference_kv import ReferenceKVCache

HIDDEN = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def make(seed: int = 0, **overrides: object) -> Mamba2:
    settings: dict[str, object] = {"d_state": 8, "headdim": 4, "ngroups": 2, "chunk_size": 4}
    settings.update(overrides)
    block = Mamba2(Mamba2.Config(**settings), hidden_size=HIDDEN)  # type: ignore[arg-type]
    block.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # larger steps and conv weights than at init: the state matters over a few tokens
        block.dt_proj.bias.add_(2.0)
    return block


def hidden_states(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def naive(block: Mamba2, hidden: torch.Tensor) -> torch.Tensor:
    """One sequence per row, every part written out in fp64 from the block's parameters."""
    m = copy.deepcopy(block).double()
    h = hidden.double()
    batch, seq, _ = h.shape
    cfg = m.config
    z, x, b, c = (h @ p.weight.T for p in (m.z_proj, m.x_proj, m.b_proj, m.c_proj))
    dt = h @ m.dt_proj.weight.T  # (B, T, h); the bias goes to the scan
    xbc = torch.cat([x, b, c], dim=-1).transpose(1, 2)  # (B, X, T)
    weight = torch.cat([m.conv_x.weight, m.conv_b.weight, m.conv_c.weight])[:, None, :]  # (X, 1, K)
    bias = torch.cat([m.conv_x.bias, m.conv_b.bias, m.conv_c.bias])
    xbc = F.silu(F.conv1d(F.pad(xbc, (cfg.d_conv - 1, 0)), weight, bias, groups=weight.shape[0])).transpose(1, 2)
    inner, bc = x.shape[-1], b.shape[-1]
    x, b, c = xbc.split([inner, bc, bc], dim=-1)
    y, _ = ssd_sequential(
        x.reshape(batch, seq, -1, cfg.headdim),
        dt,
        -torch.exp(m.A_log.weight[:, 0]),
        b.reshape(batch, seq, cfg.ngroups, cfg.d_state),
        c.reshape(batch, seq, cfg.ngroups, cfg.d_state),
        m.D.weight[:, 0],
        dt_bias=m.dt_proj.bias,
    )
    y = y.reshape(batch, seq, inner) * F.silu(z)
    groups = y.reshape(batch, seq, cfg.ngroups, -1)
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).reshape(batch, seq, inner)
    return (y * m.norm.weight[:, 0]) @ m.out_proj.weight.T


class TestMamba2Conformance(BlockConformance):
    hidden_size = HIDDEN
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> Mamba2:
        return Mamba2(Mamba2.Config(d_state=8, headdim=4, ngroups=2, chunk_size=4), hidden_size=hidden_size)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_forward_equals_plain_composition(groups: int) -> None:
    block = make(ngroups=groups)
    hidden = hidden_states(2, 11, HIDDEN)
    assert rel(block(hidden, BlockContext()), naive(block, hidden)) < 1e-5


def test_packed_equals_each_document_alone_with_gradients() -> None:
    block = make()
    cu = [0, 3, 12, 13, 22]
    hidden = hidden_states(1, 22, HIDDEN).requires_grad_(True)
    ctx = BlockContext(cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=9)
    out = block(hidden, ctx)
    weights = hidden_states(1, 22, HIDDEN, seed=5)
    (out * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    for lo, hi in itertools.pairwise(cu):
        piece = hidden.detach()[:, lo:hi].clone().requires_grad_(True)
        out_d = block(piece, BlockContext())
        assert rel(out[:, lo:hi], out_d) < 1e-5
        assert rel(out_d, naive(block, piece.detach())) < 1e-5
        (out_d * weights[:, lo:hi]).sum().backward()
        assert hidden.grad is not None and piece.grad is not None
        assert rel(hidden.grad[:, lo:hi], piece.grad) < 1e-5
    alone_grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    assert packed_grads.keys() == alone_grads.keys() == {n for n, _ in block.named_parameters()}
    for name, grad in packed_grads.items():
        assert rel(grad, alone_grads[name]) < 1e-5, name


def test_chunked_prefill_then_decode_equals_full_forward() -> None:
    block = make()
    hidden = hidden_states(2, 13, HIDDEN)
    full, conv_full, ssm_full = block.forward_with_state(hidden, BlockContext())
    outs = []
    conv, ssm = None, None
    for lo, hi in ((0, 4), (4, 6)):  # prefill in two chunks, the state carried between them
        out, conv, ssm = block.forward_with_state(hidden[:, lo:hi], BlockContext(), conv, ssm)
        outs.append(out)
    assert conv is not None and ssm is not None
    for t in range(6, 13):  # decode one token at a time
        conv_before, ssm_before = conv.clone(), ssm.clone()
        out, conv_next, ssm_next = block.step(hidden[:, t], conv, ssm)
        assert torch.equal(conv, conv_before) and torch.equal(ssm, ssm_before)  # inputs untouched
        conv, ssm = conv_next, ssm_next
        outs.append(out[:, None])
    assert rel(torch.cat(outs, dim=1), full) < 1e-5
    assert rel(conv, conv_full) < 1e-5 and rel(ssm, ssm_full) < 1e-5
    spec = block.cache_spec()
    assert isinstance(spec, RecurrentStateSpec)
    assert tuple(conv.shape[1:]) == spec.states["conv"][0] and tuple(ssm.shape[1:]) == spec.states["ssm"][0]
    assert ssm.dtype == spec.states["ssm"][1] == torch.float32


def test_inference_cache_steps_equal_full_forward() -> None:
    block = make(ngroups=1)
    cache = ReferenceKVCache({3: block.cache_spec()}, max_seqs=4)
    seqs = {10: hidden_states(1, 9, HIDDEN, seed=2), 11: hidden_states(1, 6, HIDDEN, seed=3)}
    done = {10: 0, 11: 0}
    got: dict[int, list[torch.Tensor]] = {10: [], 11: []}
    for plan in ({10: 5, 11: 3}, {10: 1, 11: 1}, {11: 2, 10: 1}, {10: 2}):  # prefill, decode, mixed
        ids, counts = list(plan), list(plan.values())
        cache.schedule(ids, counts)
        step = torch.cat([seqs[s][:, done[s] : done[s] + n] for s, n in plan.items()], dim=1)  # (1, N, H)
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        out = block(step, BlockContext(cu_seqlens=cu, max_seqlen=max(counts), kv_cache=cache, layer_index=3))
        for (s, n), lo in zip(plan.items(), cu[:-1].tolist()):
            got[s].append(out[:, lo : lo + n])
            done[s] += n
    for s, x in seqs.items():
        assert rel(torch.cat(got[s], dim=1), block(x, BlockContext())) < 1e-5


@pytest.mark.parametrize(("tp", "groups"), [(2, 2), (4, 4), (2, 4)])
def test_declared_tensor_parallel_split_sums_to_the_whole(tp: int, groups: int) -> None:
    """Each rank's share by the declarations (``column``: dim 0 in equal parts, ``row``: dim 1) run as a
    block of ``heads / tp`` heads; the row-parallel outputs summed over the ranks equal the whole block's."""
    block = make(ngroups=groups)
    hidden = hidden_states(2, 9, HIDDEN)
    specs = collect_param_specs(block)
    assert {n for n, s in specs.items() if s.tp == "row"} == {"out_proj.weight"}
    total = torch.zeros(2, 9, HIDDEN)
    for rank in range(tp):
        cfg = copy.copy(block.config)
        cfg.num_heads, cfg.ngroups = block.num_heads // tp, groups // tp
        part = Mamba2(cfg, hidden_size=HIDDEN)
        with torch.no_grad():
            for name, param in block.named_parameters():
                style = specs[name].tp
                if style == "column":
                    value = param.chunk(tp, dim=0)[rank]
                elif style == "row":
                    value = param.chunk(tp, dim=1)[rank]
                else:
                    value = param
                part.get_parameter(name).copy_(value)
        total += part(hidden, BlockContext())
    assert rel(total, block(hidden, BlockContext())) < 1e-5


def test_meta_construction_draws_the_declared_inits() -> None:
    cfg = Mamba2.Config(d_state=8, headdim=4, dt_min=0.01, dt_max=0.05, a_init_min=2.0, a_init_max=4.0)
    shared = BlockShared(hidden_size=HIDDEN, init_std=0.1, output_init_std=0.01)
    with torch.device("meta"):
        block = Mamba2(cfg, hidden_size=HIDDEN, shared=shared)
    done = init_params(block, seed=3, device="cpu")
    block.requires_grad_(False)
    assert not done.reset_modules  # every parameter declares its init
    step = F.softplus(block.dt_proj.bias)
    assert bool(((step >= 0.01 - 1e-6) & (step <= 0.05 + 1e-6)).all()) and float(step.std()) > 0
    decay = torch.exp(block.A_log.weight)
    assert bool(((decay >= 2.0 - 1e-5) & (decay <= 4.0 + 1e-5)).all())
    assert torch.equal(block.D.weight, torch.ones(8, 1)) and torch.equal(block.norm.weight, torch.ones(32, 1))
    assert abs(float(block.z_proj.weight.std()) - 0.1) < 0.03
    assert abs(float(block.out_proj.weight.std()) - 0.01) < 0.003
    bound = 1 / math.sqrt(cfg.d_conv)
    assert float(block.conv_x.weight.abs().max()) <= bound
    hand = Mamba2(cfg, hidden_size=HIDDEN, shared=shared)  # built by hand: the same distributions
    assert float(F.softplus(hand.dt_proj.bias.detach()).min()) >= 0.01 - 1e-6
    assert hand.num_parameters() == block.num_parameters()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"d_state": 0}, "d_state = 0"),
        ({"d_state": None}, "d_state = None"),
        ({"dt_max": "0.1"}, "dt_max = '0.1'"),
        ({"d_conv": 1}, "d_conv = 1"),
        ({"headdim": 5}, "headdim = 5: must divide expand"),
        ({"ngroups": 3}, "ngroups = 3: must divide the 8 heads"),
        ({"num_heads": 6, "ngroups": 4}, "ngroups = 4: must divide num_heads = 6"),
        ({"dt_min": 0.2}, "dt_min = 0.2, dt_max = 0.1"),
        ({"dt_limit_min": 0.5, "dt_limit_max": 0.1}, "dt_limit_max = 0.1"),
        ({"a_init_min": 20.0}, "a_init_min = 20.0"),
        ({"norm_eps": float("nan")}, "norm_eps = nan"),
        ({"chunk_size": True}, "chunk_size = True"),
    ],
)
def test_bad_config_names_the_key(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mamba2(Mamba2.Config(**{"headdim": 4, **settings}), hidden_size=HIDDEN)  # type: ignore[arg-type]


def test_dt_limit_clamps_the_step() -> None:
    block = make(dt_limit_min=0.05, dt_limit_max=0.2)
    hidden = hidden_states(1, 7, HIDDEN)
    free = make(dt_limit_max=None)
    assert rel(block(hidden, BlockContext()), free(hidden, BlockContext())) > 1e-3  # the clamp is applied
    out, conv, ssm = block.forward_with_state(hidden[:, :6], BlockContext())
    last, _, _ = block.step(hidden[:, 6], conv, ssm)
    assert rel(last, block(hidden, BlockContext())[:, 6]) < 1e-5


def test_registered_as_block_mamba2() -> None:
    host = isolated_host("mcore_ssm.plugin", builtins=False)
    assert host.load("block", "mamba2") is Mamba2
