"""The ``gpt`` model's two seams for layouts: the swappable loss head and the pipeline stages.

The loss head must give exactly the loss the model always gave (bit for bit without a
``loss_group``), split batches must add up over a real 2-rank gloo group, and stages cut from the
model must keep its names, share its tensors and reproduce its loss and every gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.construct import init_params
from mcore.protocols.block import AuxLosses, BlockContext, BlockShared
from mcore.protocols.model import LossHead, StagedModel
from mcore_models.blocks.masking import positions_from_cu_seqlens
from mcore_models.blocks.mtp import NEXT_EMBEDDINGS
from mcore_models.gpt import GPT, LOCAL_BLOCKS, GPTConfig
from mcore_models.kernels.linear_ce import linear_cross_entropy_sum
from mcore_models.loss_head import GPTLossHead, mtp_labels
from mcore_models.presets import preset_config
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close

CU = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)  # 2 rows of 10 tokens, 4 documents


def tiny(**overrides: object) -> GPTConfig:
    return preset_config("tiny", **{"loss_chunk_size": 7, **overrides})


def small_deepseek(**overrides: object) -> GPTConfig:
    """MLA with dense MLPs (no MoE): deepseek-v3-mini-dense's layer kinds at test size."""
    values = {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 3,
        "loss_chunk_size": 7,
        "swiglu": {"ffn_hidden_size": 96},
        "mla": {"q_lora_rank": 32, "kv_lora_rank": 24},
        "mtp_num_layers": 2,
    }
    return preset_config("deepseek-v3-mini-dense", **{**values, **overrides})


def batch(cfg: GPTConfig, rows: int = 2, seq: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = tokens.roll(-1, dims=1)
    labels[0, :3] = -100  # rows hold different label counts
    return tokens, labels


def packed(packed_docs: bool) -> BlockContext:
    return BlockContext(cu_seqlens=CU, max_seqlen=7) if packed_docs else BlockContext()


# -- the loss head -----------------------------------------------------------------------------------


def hand_loss(model: GPT, tokens: torch.Tensor, labels: torch.Tensor, packed_docs: bool) -> torch.Tensor:
    """The model's loss as it was computed inside ``GPT.forward`` before the loss head existed."""
    batch_rows, seq = tokens.shape
    cfg = model.config
    positions = positions_from_cu_seqlens(CU, batch_rows, seq) if packed_docs else None
    ctx = dataclasses.replace(packed(packed_docs), positions=positions, aux_losses=AuxLosses())
    weight = model.embed.weight if model.head is None else model.head.weight

    def mean_loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat_labels = labels.reshape(-1)
        total = linear_cross_entropy_sum(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            flat_labels,
            chunk_size=cfg.loss_chunk_size,
            vocab_chunk_size=cfg.loss_vocab_chunk_size,
            scale=model.logit_scale,
        )
        return total / (flat_labels != -100).sum().clamp(min=1)

    hidden = model.embed(tokens)
    for index, layer in enumerate(model.layers):
        hidden = layer(hidden, ctx.for_layer(index))
    loss = mean_loss(model.final_norm(hidden, ctx), labels)
    if len(model.mtp):
        pos = positions if positions is not None else torch.arange(seq).expand(batch_rows, seq)
        mtp_total = torch.zeros(())
        for depth, (module, norm) in enumerate(zip(model.mtp, model.mtp_norms, strict=True), start=1):
            view = ctx.for_layer(
                len(model.layers) + depth - 1, extra={NEXT_EMBEDDINGS: model.embed(tokens.roll(-depth, 1))}
            )
            hidden = module(hidden, view)
            mtp_total = mtp_total + mean_loss(norm(hidden, view), mtp_labels(labels, pos, depth))
        loss = loss + cfg.mtp_loss_weight / len(model.mtp) * mtp_total
    return loss


def unfused_loss(model: GPT, tokens: torch.Tensor, labels: torch.Tensor, packed_docs: bool) -> torch.Tensor:
    """The same loss with plain ``F.cross_entropy`` means (full logits), from the model's modules."""
    seq = tokens.shape[1]
    ctx = packed(packed_docs)
    positions = positions_from_cu_seqlens(CU, 2, seq) if packed_docs else torch.arange(seq).expand(2, seq)
    ctx = dataclasses.replace(ctx, positions=positions, aux_losses=AuxLosses())
    weight = model.embed.weight if model.head is None else model.head.weight

    def ce(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight) * model.logit_scale
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    hidden = model.embed(tokens)
    for index, layer in enumerate(model.layers):
        hidden = layer(hidden, ctx.for_layer(index))
    loss = ce(model.final_norm(hidden), labels)
    parts = []
    for depth, (module, norm) in enumerate(zip(model.mtp, model.mtp_norms, strict=True), start=1):
        view = ctx.for_layer(
            len(model.layers) + depth - 1, extra={NEXT_EMBEDDINGS: model.embed(tokens.roll(-depth, 1))}
        )
        hidden = module(hidden, view)
        parts.append(ce(norm(hidden), mtp_labels(labels, positions, depth)))
    return loss + (model.config.mtp_loss_weight * sum(parts) / len(parts) if parts else 0.0)


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(tie_embeddings=True, mtp_num_layers=2, mup_base_width=32),
        small_deepseek(),
        small_deepseek(tie_embeddings=True, loss_vocab_chunk_size=50),
    ],
    ids=["tiny", "tiny-tied-mtp-mup", "mla-mtp", "mla-tied-mtp-vocab-blocks"],
)
@pytest.mark.parametrize("packed_docs", [False, True], ids=["rows", "packed"])
def test_loss_head_gives_the_models_loss_bit_for_bit(cfg: GPTConfig, packed_docs: bool) -> None:
    model = GPT.build(cfg, seed=0, device="cpu")
    tokens, labels = batch(cfg)
    loss = model(tokens, labels=labels, ctx=packed(packed_docs))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = hand_loss(model, tokens, labels, packed_docs)
    assert torch.equal(loss, ref)  # no loss_group: the same ops as before the head existed
    for g, r in zip(grads, torch.autograd.grad(ref, params), strict=True):
        assert torch.equal(g, r)
    assert_rel_close(loss, unfused_loss(model, tokens, labels, packed_docs))


def test_logits_come_from_the_loss_head() -> None:
    cfg = tiny(mup_base_width=32)
    model = GPT.build(cfg, seed=0, device="cpu")
    tokens, _ = batch(cfg)
    hidden = model.embed(tokens)
    for index, layer in enumerate(model.layers):
        hidden = layer(hidden, BlockContext().for_layer(index))
    logits = model(tokens)
    assert torch.equal(logits, model.loss_head(hidden, tokens=tokens, labels=None, ctx=BlockContext()))
    assert_rel_close(logits, F.linear(model.final_norm(hidden), model.head.weight) * 0.5)


class RecordingHead(nn.Module):
    """A layout's replacement head: records its calls and returns a value the real head cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def forward(
        self, hidden: torch.Tensor, *, tokens: torch.Tensor, labels: torch.Tensor | None, ctx: BlockContext
    ) -> torch.Tensor:
        self.calls.append(labels is None)
        return hidden.sum() * 0 + 123.0


def test_a_swapped_loss_head_is_called_and_the_old_one_is_not() -> None:
    model = GPT.build(tiny(mtp_num_layers=1), seed=0, device="cpu")
    names = list(model.state_dict())
    old = model.loss_head

    def must_not_run(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the replaced loss head was called")

    old.forward = must_not_run  # type: ignore[method-assign]
    new = RecordingHead()
    model.loss_head = new
    tokens, labels = batch(model.config)
    assert model(tokens, labels=labels).item() == 123.0
    assert model(tokens).item() == 123.0  # the logits path goes through the head too
    assert new.calls == [False, True]
    # a seam, not a child: names and modules are unchanged
    assert list(model.state_dict()) == names
    assert all("loss_head" not in name for name, _ in model.named_modules())


def test_loss_head_owns_nothing_and_follows_a_deepcopy() -> None:
    model = GPT.build(small_deepseek(), seed=0, device="cpu")
    assert isinstance(model, StagedModel) and isinstance(model.loss_head, LossHead)
    assert isinstance(model.loss_head, GPTLossHead) and not list(model.loss_head.parameters())
    names = list(model.state_dict())
    assert {"final_norm.weight", "head.weight", "mtp.0.proj.weight", "mtp_norms.1.weight"} <= set(names)
    assert all("loss_head" not in name for name in names) and "loss_head" not in dict(model.named_children())
    twin = copy.deepcopy(model)
    parts = twin.loss_head.parts
    assert parts.final_norm is twin.final_norm and parts.embed is twin.embed and parts.head is twin.head
    assert parts.mtp is twin.mtp and parts.mtp_norms is twin.mtp_norms and twin.loss_head is not model.loss_head
    tokens, labels = batch(model.config)
    with torch.no_grad():
        twin.head.weight.mul_(2)  # the copy's head computes with the copy's weights, not the original's
    assert not torch.equal(twin(tokens, labels=labels), model(tokens, labels=labels))
    with torch.no_grad():
        twin.head.weight.div_(2)
    assert torch.equal(twin(tokens, labels=labels), model(tokens, labels=labels))


def _split_rows_add_up(tie: bool) -> None:
    rank = dist.get_rank()
    cfg = tiny(tie_embeddings=tie, mtp_num_layers=1)
    model = GPT.build(cfg, seed=0, device="cpu")
    tokens, labels = batch(cfg, rows=4, seq=12, seed=1)
    labels[0, :9] = -100  # rank 0's rows hold far fewer labels than rank 1's
    params = list(model.parameters())
    whole = model(tokens, labels=labels)
    whole_grads = torch.autograd.grad(whole, params)

    group = dist.new_group([0, 1])
    mine = slice(2 * rank, 2 * rank + 2)
    part = model(tokens[mine], labels=labels[mine], ctx=BlockContext(loss_group=group))
    grads = torch.autograd.grad(part, params)
    local_mean = model(tokens[mine], labels=labels[mine])  # what each rank gave before loss_group
    total, naive = part.detach().clone(), local_mean.detach().clone()
    dist.all_reduce(total)
    dist.all_reduce(naive)
    assert_rel_close(total, whole, tol=1e-5, name="summed loss")
    assert abs(naive.item() / 2 - whole.item()) > 1e-3  # the rows' counts differ: a mean of means is wrong
    for (name, _), g, ref in zip(model.named_parameters(), grads, whole_grads, strict=True):
        dist.all_reduce(g)
        assert_rel_close(g, ref, tol=1e-5, name=name)


@distributed(2)
def test_losses_of_split_rows_add_up_to_the_batch_loss_over_the_loss_group() -> None:
    for tie in (False, True):
        _split_rows_add_up(tie)


# -- pipeline stages ---------------------------------------------------------------------------------


def stage_ranges(sizes: list[int]) -> list[range]:
    """Consecutive layer ranges of the given sizes."""
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def cut(model: GPT, sizes: list[int]) -> list[nn.Module]:
    ranges = stage_ranges(sizes)
    return [model.pipeline_stage(layers, first=i == 0, last=i == len(ranges) - 1) for i, layers in enumerate(ranges)]


def run_stages(
    stages: list[nn.Module], tokens: torch.Tensor, labels: torch.Tensor | None, ctx: BlockContext
) -> torch.Tensor:
    """What a schedule does with one micro-batch, in one process: the stages in order."""
    out = tokens
    for stage in stages:
        out = stage(out, tokens=tokens, labels=labels, ctx=ctx)
    return out


#: (config, layers per stage, packed documents): 2 and 3 stages, tied and untied, MTP on and off, GQA and MLA.
STAGE_CASES = [
    (tiny(num_layers=4), [1, 3], True),
    (tiny(num_layers=4, tie_embeddings=True), [3, 1], False),
    (tiny(num_layers=4, tie_embeddings=True, mtp_num_layers=1), [0, 4], True),
    (tiny(num_layers=4, mtp_num_layers=2), [1, 2, 1], True),
    (tiny(num_layers=4), [2, 1, 1], False),
    (small_deepseek(), [1, 2], False),
    (small_deepseek(tie_embeddings=True), [1, 1, 1], True),
    (small_deepseek(mtp_num_layers=0), [2, 0, 1], True),
]


@pytest.mark.parametrize(("cfg", "sizes", "packed_docs"), STAGE_CASES)
def test_stages_in_sequence_give_the_models_loss_and_gradients(
    cfg: GPTConfig, sizes: list[int], packed_docs: bool
) -> None:
    model = GPT.build(cfg, seed=0, device="cpu")
    stages = cut(model, sizes)
    tokens, labels = batch(cfg)
    params = list(model.parameters())
    loss = model(tokens, labels=labels, ctx=packed(packed_docs))
    grads = torch.autograd.grad(loss, params)
    staged = run_stages(stages, tokens, labels, packed(packed_docs))
    assert torch.equal(staged, loss)
    for (name, _), g, ref in zip(model.named_parameters(), torch.autograd.grad(staged, params), grads, strict=True):
        assert torch.equal(g, ref), name
    assert torch.equal(run_stages(stages, tokens, None, packed(packed_docs)), model(tokens, ctx=packed(packed_docs)))


@pytest.mark.parametrize(("cfg", "sizes"), [case[:2] for case in STAGE_CASES])
def test_stages_keep_the_models_names_and_tensors(cfg: GPTConfig, sizes: list[int], tmp_path: Path) -> None:
    model = GPT.build(cfg, seed=0, device="cpu")
    stages = cut(model, sizes)
    whole = model.state_dict()
    own = dict(model.named_parameters(remove_duplicate=False))
    keys: set[str] = set()
    for stage, layers in zip(stages, stage_ranges(sizes), strict=True):
        state = stage.state_dict()
        assert set(state) <= set(whole)
        assert {int(k.split(".")[1]) for k in state if k.startswith("layers.")} == set(layers)
        for name, tensor in state.items():
            assert tensor.data_ptr() == whole[name].data_ptr(), name  # the model's own storage
        for name, param in stage.named_parameters():
            assert param is own[name], name
        keys |= set(state)
    assert keys == set(whole)
    if cfg.tie_embeddings or cfg.mtp_num_layers:  # the last stage holds the shared embedding too
        assert "embed.weight" in stages[-1].state_dict()
    else:
        assert "embed.weight" not in stages[-1].state_dict()

    # a checkpoint written stage by stage loads, strictly, into the whole model
    for i, stage in enumerate(stages):
        torch.save(stage.state_dict(), tmp_path / f"stage{i}.pt")
    merged: dict[str, torch.Tensor] = {}
    for i in range(len(stages)):
        merged.update(torch.load(tmp_path / f"stage{i}.pt", weights_only=True))
    fresh = GPT.build(cfg, seed=7, device="cpu")
    fresh.load_state_dict(merged, strict=True)
    tokens, labels = batch(cfg)
    assert torch.equal(fresh(tokens, labels=labels), model(tokens, labels=labels))


def test_a_stage_built_on_meta_initialises_to_the_models_values() -> None:
    cfg = small_deepseek(tie_embeddings=True)
    with torch.device("meta"):
        skeleton = GPT(cfg)
    stage = skeleton.pipeline_stage(range(2, 3), first=False, last=True)
    init_params(stage, seed=5, device="cpu")
    reference = GPT.build(cfg, seed=5, device="cpu").state_dict()
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_pipeline_stage_rejects_a_range_outside_the_layers() -> None:
    model = GPT.build(tiny(), seed=0, device="cpu")
    assert model.stage_layers() == 2
    for bad in (range(0, 3), range(0, 2, 2), range(2, 1)):
        with pytest.raises(ValueError, match=r"^pipeline_stage\(layers=.*0 <= start <= stop <= 2$"):
            model.pipeline_stage(bad, first=True, last=True)


class AuxMLP(nn.Module):
    """An MLP that adds an auxiliary loss depending on its input (a MoE balance loss stands for it)."""

    def __init__(self, *, hidden_size: int, shared: BlockShared) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        ctx.add_aux_loss("toy", 0.01 * hidden.float().pow(2).mean())
        return self.proj(hidden)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.proj.weight, std=0.02, generator=generator)


def test_each_stage_collects_its_aux_losses_and_the_last_adds_only_its_own() -> None:
    cfg = tiny(num_layers=3, mlp="aux-mlp", mtp_num_layers=1)
    model = GPT.build(cfg, seed=0, device="cpu", block_lookup={**LOCAL_BLOCKS, "aux-mlp": AuxMLP}.__getitem__)
    stages = cut(model, [1, 1, 1])
    tokens, labels = batch(cfg)
    params = list(model.parameters())
    loss = model(tokens, labels=labels)
    grads = torch.autograd.grad(loss, params)

    ctx = BlockContext(aux_losses=AuxLosses())  # the schedule's collector for this micro-batch
    last = run_stages(stages, tokens, labels, ctx)
    collected = ctx.aux_losses or {}
    assert sorted(collected) == [(0, "toy"), (1, "toy"), (2, "toy"), (3, "toy")]  # the model's layer indices
    others = collected[(0, "toy")] + collected[(1, "toy")]  # the schedule backpropagates these with the loss
    total = last + others
    assert_rel_close(total, loss, tol=1e-6)
    for (name, _), g, ref in zip(model.named_parameters(), torch.autograd.grad(total, params), grads, strict=True):
        assert_rel_close(g, ref, tol=1e-6, name=name)
