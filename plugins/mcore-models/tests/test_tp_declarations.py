"""What the ``gpt`` model tells a ``tp`` layout: each parameter's declared split, and a vocab-parallel loss head.

The layout reads ``ParamSpec.tp`` instead of matching module classes, so every matrix of every preset
must declare it (and the declarations must fit the shapes: whole heads, biases following their
weights). ``GPTLossHead.vocab_parallel(group)`` must give the single-process loss and gradients when the
output weight is split by rows over real gloo ranks (2 and 3), as a plain tensor of the rank's rows or a
``Shard(0)`` DTensor, tied or not, with MTP depths, muP's logit scale and packed documents; without
labels it returns the whole logits. MLA's head views must run on a rank's share of the heads.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mcore.errors import UserError
from mcore.params import check_param_specs, tp_style
from mcore.protocols.block import BlockContext, BlockShared
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.loss_head import GPTLossHead
from mcore_models.presets import PRESETS, preset_config
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close, seeded_randn

CU = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)  # 2 rows of 10 tokens, 4 documents

#: The split each projection declares, by the last two parts of its name (``attention.q.weight`` -> ``q.weight``).
EXPECTED = {
    **{f"{n}.weight": "column" for n in ("q", "k", "v", "gate", "up", "q_up", "kv_up")},
    **{f"{n}.bias": "column" for n in ("q", "k", "v", "gate", "up")},
    **{f"{n}.weight": "row" for n in ("out", "down")},
    **{f"{n}.bias": "replicate" for n in ("out", "down")},
    **{f"{n}.weight": "replicate" for n in ("q_down", "kv_down", "proj")},
}

#: Presets, and variants reaching every block and option a preset does not (biases, LayerNorm, GeLU, QK-norm).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name in PRESETS},
    "tiny-biases-qknorm-layernorm-gelu": (
        "tiny",
        {
            "attention": {"qkv_bias": True, "out_bias": True, "qk_norm": True},
            "mlp": "gelu-mlp",
            "gelu-mlp": {"mlp_bias": True},
            "norm": "layernorm",
            "mtp_num_layers": 1,
        },
    ),
    "tiny-clamped-swiglu-bias": ("tiny", {"mlp": "clamped-swiglu", "clamped-swiglu": {"mlp_bias": True}}),
    "mla-no-q-lora-tied": ("deepseek-v3-mini-dense", {"mla": {"q_lora_rank": None}, "tie_embeddings": True}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_declares_how_tensor_parallelism_splits_it(variant: str) -> None:
    name, overrides = VARIANTS[variant]
    model = GPT.build(preset_config(name, **overrides), seed=0, device="meta")
    specs = check_param_specs(model)  # declared names exist; splits, head rows and tp fit the shapes
    params = dict(model.named_parameters())
    for key, spec in specs.items():
        style, shape = tp_style(spec), tuple(params[key].shape)
        assert style is not None, f"{key}: role {spec.role!r} without a tp declaration"
        suffix = ".".join(key.split(".")[-2:])
        if spec.role in ("embedding", "head"):
            assert style == "vocab", key
        elif (".q_norm." in key or ".k_norm." in key) and isinstance(
            model.get_submodule(key.rsplit(".", 2)[0]), Attention
        ):
            assert style == "partial", key  # QK-norm scales act on a rank's own heads: gradients summed
        elif spec.role == "norm" or isinstance(model.get_submodule(key.rpartition(".")[0]), (RMSNorm, LayerNorm)):
            assert style == "replicate", key  # norm scales and a LayerNorm's bias
        elif key in ("embed.weight", "head.weight"):
            raise AssertionError(f"{key} has role {spec.role!r}")
        else:
            assert style == EXPECTED[suffix], f"{key}: tp = {style!r}, expected {EXPECTED[suffix]!r}"
        if style == "column" and spec.head_rows is not None:
            assert shape[0] % spec.head_rows == 0, key
        if style in ("row", "vocab"):
            assert len(shape) == 2, key
    # the attention's (or MLA's) per-head projections declare their head rows, so a rank holds whole heads
    for key, spec in specs.items():
        if key.endswith(("q.weight", "k.weight", "v.weight", "q_up.weight", "kv_up.weight")):
            assert spec.head_rows is not None, key


def test_mla_runs_on_a_ranks_share_of_the_heads() -> None:
    """Heads split after the latent projections: ``q_up``/``kv_up`` rows in whole heads, ``out`` columns;
    each rank's partial output sums to the whole block's (the views count heads with ``-1``)."""
    torch.manual_seed(0)
    cfg = MLA.Config(num_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    block = MLA(cfg, hidden_size=32, shared=BlockShared(hidden_size=32))
    x = seeded_randn(2, 5, 32, seed=1)
    full = block(x, BlockContext())
    tp = 2
    parts = []
    for rank in range(tp):
        shard = copy.deepcopy(block)
        for name in ("q_up", "kv_up"):
            linear = getattr(shard, name)
            linear.weight = nn.Parameter(linear.weight.detach().chunk(tp, dim=0)[rank].clone())  # whole heads
        shard.out.weight = nn.Parameter(shard.out.weight.detach().chunk(tp, dim=1)[rank].clone())
        parts.append(shard(x, BlockContext()))
    assert_rel_close(torch.stack(parts).sum(0), full, tol=1e-5, name="MLA tensor-parallel output")


# -- the vocab-parallel loss head, on real gloo ranks ------------------------------------------------


class _SumOverGroup(torch.autograd.Function):
    """All-reduce forward, identity backward (every rank's loss is the same: each keeps its own gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def gpt_head(model: GPT) -> GPTLossHead:
    assert isinstance(model.loss_head, GPTLossHead)
    return model.loss_head


def shard_by_hand(model: GPT, group: Any, *, as_dtensor: bool) -> GPT:
    """A copy of ``model`` with its output weight split by rows over ``group`` (what a ``tp`` layout does
    to the head; the layers stay whole) and its loss head swapped for the vocab-parallel one. A tied
    weight is the embedding's: its lookups become vocab-parallel too (this rank's rows, summed)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    twin = copy.deepcopy(model)
    owner = twin.embed if twin.head is None else twin.head
    if as_dtensor:
        mesh = DeviceMesh.from_group(group, "cpu")  # 1-D, ordered like the group
        owner.weight = nn.Parameter(distribute_tensor(owner.weight.detach(), mesh, [Shard(0)]))
    else:
        owner.weight = nn.Parameter(owner.weight.detach().chunk(world)[rank].clone())
    if twin.head is None:
        embed, rows = twin.embed, model.config.vocab_size // world

        def lookup(tokens: torch.Tensor) -> torch.Tensor:
            weight = embed.weight.to_local() if isinstance(embed.weight, DTensor) else embed.weight
            local = tokens - rank * rows
            mine = (local >= 0) & (local < rows)
            found = weight[local.clamp(0, rows - 1)] * mine[..., None]  # (B, T, H): zeros for other ranks' rows
            return _SumOverGroup.apply(found, group)

        embed.forward = lookup  # type: ignore[method-assign, assignment]
    names = [name for name, _ in twin.named_parameters()]
    twin.loss_head = gpt_head(twin).vocab_parallel(group)
    assert [name for name, _ in twin.named_parameters()] == names  # the head owns nothing: no new names
    return twin


def compare_grads(model: GPT, twin: GPT, output: str, rank: int, world: int, where: str) -> None:
    """Every parameter's gradient equals the single-process one; the output weight's: its rank's rows."""
    rows = model.config.vocab_size // world
    for (name, ref), (_, param) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if ref.grad is None:  # not on this path (MTP layers under the logits)
            assert param.grad is None, name
            continue
        assert param.grad is not None, name
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        expected = ref.grad[rank * rows : (rank + 1) * rows] if name == output else ref.grad
        assert_rel_close(grad, expected, tol=1e-5, name=f"{name}.grad ({where})")


def check_against_single_process(cfg: GPTConfig, group: Any, *, as_dtensor: bool, packed_docs: bool) -> None:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    model = GPT.build(cfg, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
    labels = tokens.roll(-1, dims=1)
    labels[0, :3] = -100
    ctx = BlockContext(cu_seqlens=CU, max_seqlen=6) if packed_docs else BlockContext()
    twin = shard_by_hand(model, group, as_dtensor=as_dtensor)
    where = f"{cfg.tie_embeddings=} {cfg.mtp_num_layers=} {as_dtensor=} {packed_docs=} rank {rank}/{world}"

    loss = model(tokens, labels=labels, ctx=ctx)
    loss.backward()
    tp_loss = twin(tokens, labels=labels, ctx=dataclasses.replace(ctx))
    tp_loss.backward()
    assert_rel_close(tp_loss, loss, tol=1e-5, name=f"loss ({where})")
    output = "embed.weight" if cfg.tie_embeddings else "head.weight"
    compare_grads(model, twin, output, rank, world, where)

    # without labels: the whole logits on every rank, differentiable like the model's
    model.zero_grad()
    twin.zero_grad()
    weights = seeded_randn(2, 10, cfg.vocab_size, seed=3)
    logits, tp_logits = model(tokens, ctx=ctx), twin(tokens, ctx=dataclasses.replace(ctx))
    assert tp_logits.shape == (2, 10, cfg.vocab_size)
    assert_rel_close(tp_logits, logits, tol=1e-5, name=f"logits ({where})")
    (logits * weights).sum().backward()
    (tp_logits * weights).sum().backward()
    compare_grads(model, twin, output, rank, world, f"logits, {where}")


def tiny(**overrides: object) -> GPTConfig:
    return preset_config("tiny", **{"vocab_size": 96, "loss_chunk_size": 7, **overrides})


def _vocab_parallel_cases(group: Any) -> None:
    world = dist.get_world_size(group)
    check_against_single_process(tiny(), group, as_dtensor=False, packed_docs=False)
    check_against_single_process(tiny(), group, as_dtensor=True, packed_docs=True)
    tied_mtp = tiny(tie_embeddings=True, mtp_num_layers=2, mup_base_width=32)
    check_against_single_process(tied_mtp, group, as_dtensor=world == 3, packed_docs=True)
    untied_mtp = tiny(mtp_num_layers=1, mup_base_width=128)
    check_against_single_process(untied_mtp, group, as_dtensor=world == 2, packed_docs=False)


@distributed(3)  # one spawn for both sizes: 3 ranks, then the 2 ranks [1, 2] (group ranks are not global ranks)
def test_vocab_parallel_head_gives_the_single_process_loss_and_gradients_on_3_and_2_ranks() -> None:
    torch.set_num_threads(1)  # this rank's process only: 3 ranks x 2 threads on 2 cores run 10x slower
    _vocab_parallel_cases(dist.group.WORLD)
    pair = dist.new_group([1, 2])  # every rank creates it; ranks 1 and 2 use it
    if dist.get_rank() in (1, 2):
        _vocab_parallel_cases(pair)
        model = GPT.build(tiny(loss_vocab_chunk_size=16), seed=0, device="cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gpt_head(model).vocab_parallel(pair)
        assert any("loss_vocab_chunk_size = 16 is not used" in str(w.message) for w in caught)

    model = GPT.build(tiny(vocab_size=100), seed=0, device="cpu")
    with pytest.raises(UserError, match=r"model.vocab_size = 100 does not split over the 3 ranks") as err:
        gpt_head(model).vocab_parallel(dist.group.WORLD)
    assert "\n" not in str(err.value)
    model = GPT.build(tiny(), seed=0, device="cpu")  # the whole weight, not this rank's rows: refused
    model.loss_head = gpt_head(model).vocab_parallel(dist.group.WORLD)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"holds 96 rows on each of 3 ranks for a vocabulary of 96"):
        model(tokens, labels=tokens)
