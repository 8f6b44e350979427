"""``tp``: the conformance suite on 2 ranks (kv heads >= tp and GQA with kv heads < tp), hand-checked
training on 4 processes (tp2 and tp4 in one spawned group), the core's run loop with a checkpoint
saved on 2 processes and resumed on 1, and what needs no process group (errors, registration, tp1).

The 4-process cases: 3 SGD steps of tp2 (kv heads split) and tp4 (kv heads kept whole, summed)
equal one process, loss and every gradient (fp32, rel 1e-5); a vocab-parallel loss head (untied
and tied) gets the split output weight; a model built on the meta device and initialised after
``apply`` holds the single-process build's values bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_run_helpers import corpus as make_corpus
from parallel_run_helpers import host as make_host
from parallel_run_helpers import metrics, run_config
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from mcore.config import RunConfig
from mcore.construct import init_params
from mcore.mesh import ParallelMesh, build_mesh
from mcore.params import ParamSpec
from mcore.train import run
from mcore.train.grads import global_grad_norm
from mcore.vocab_parallel import vocab_parallel_cross_entropy_sum
from mcore_parallel import plugin
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear, VocabShardEmbedding
from mcore_parallel.tp_overlap import OverlappedRowLinear
from mcore_parallel.tp_overlap_gather import GatheredInputLinear
from mcore_testing import run_distributed
from mcore_testing.conformance import LayoutConformance
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, embed, head_loss, tiny_batches

GQA = TinyConfig(fused=False, num_heads=4, num_kv_heads=2)


# -- the harness's suite -------------------------------------------------------------------------------
class TestTPConformance(LayoutConformance):
    world_size = 2
    fill_dim = "tp"

    def make_layout(self) -> TPLayout:
        return TPLayout()

    def model_config(self) -> TinyConfig:
        return TinyConfig(fused=False)


class TestTPSharedKVConformance(TestTPConformance):
    """One key/value head for two ranks: kept whole, each rank projecting with it, gradients summed."""

    def model_config(self) -> TinyConfig:
        return TinyConfig(fused=False, num_kv_heads=1)


class TestTPSequenceParallelConformance(TestTPConformance):
    """Sequence parallelism: the residual stream between blocks split by tokens, norms' gradients summed."""

    def make_layout(self) -> TPLayout:
        return TPLayout(TPLayout.Config(sequence_parallel=True))


# -- a model whose loss head can be vocab-parallel ------------------------------------------------------
class _Head:
    """A ``LossHead`` over a ``TinyTransformer``'s final norm and output weight (``lm_head``, or the
    embedding when tied); ``vocab_parallel(group)`` gives the head over the rank's rows."""

    def __init__(self, model: Any, group: Any = None) -> None:
        self.model, self.group = model, group

    def weight(self) -> torch.Tensor:
        return self.model.embed.weight if self.model.lm_head is None else self.model.lm_head.weight  # (V, H)

    def __call__(self, hidden: torch.Tensor, *, tokens: torch.Tensor, labels: torch.Tensor | None, ctx: Any) -> Any:
        if self.group is None:
            if self.model.lm_head is not None:
                return head_loss(self.model, hidden, labels, ctx)
            logits = self.model.norm(hidden) @ self.weight().T  # (B, T, V)
            return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # type: ignore[union-attr]
        weight = self.weight()
        assert isinstance(weight, DTensor) and weight.placements == (Shard(0),)
        local = weight.to_local()  # (Vr, H)
        start = dist.get_rank(self.group) * local.shape[0]
        flat = labels.flatten()  # type: ignore[union-attr]
        total = vocab_parallel_cross_entropy_sum(
            self.model.norm(hidden).flatten(0, 1), local, flat, vocab_start=start, group=self.group
        )
        return total / (flat != -100).sum()

    def vocab_parallel(self, group: Any) -> _Head:
        return _Head(self.model, group)


class HeadedTiny(TinyTransformer):
    def __init__(self, cfg: TinyConfig, *, tied: bool) -> None:
        super().__init__(cfg, seed=0)
        if tied:
            self.lm_head = None  # type: ignore[assignment]
        self.loss_head = _Head(self)

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        x = embed(self, tokens, ctx)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.loss_head(x, tokens=tokens, labels=labels, ctx=ctx)  # type: ignore[no-any-return]


# -- cases on 4 processes: a (2, tp) mesh for tp2 (both tp groups compute the same), (tp4) for tp4 ----------
def _mesh(tp: int) -> ParallelMesh:
    if tp == dist.get_world_size():
        return build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    return build_mesh(("dp_replicate", "tp"), {"tp": tp}, fill="dp_replicate", device_type="cpu")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_grads(model: nn.Module, reference: nn.Module, what: str) -> None:
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and ref[name].grad is not None, f"{what}: {name} has no gradient"
        if isinstance(p, DTensor):  # each rank holds the gradient of its own shard, never the whole
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, (name, p.grad)
            assert p.grad.to_local().shape == p.to_local().shape, name
        assert_rel_close(_full(p.grad), ref[name].grad, 1e-5, name=f"{what}: grad of {name}")  # type: ignore[arg-type]


def case_sgd_steps_equal_one_process() -> None:
    """tp2 (kv heads split) and tp4 (2 kv heads for 4 ranks: whole, summed), each without and with
    sequence parallelism, and with the row-parallel reductions (and, under sequence parallelism, the gathers
    before the column-parallel GEMMs) overlapped in chunks: 3 SGD steps, the second with two micro-batches (the first under
    no_grad_sync), equal one process step by step, global gradient norm included."""
    for tp, sp, chunks in ((2, False, 1), (4, False, 1), (2, True, 1), (4, True, 1), (2, False, 3), (4, True, 2)):
        reference = TinyTransformer(GQA, seed=0)
        layout = TPLayout(TPLayout.Config(sequence_parallel=sp, overlap_chunks=chunks))
        model = layout.apply(copy.deepcopy(reference), _mesh(tp))
        assert isinstance(model.layers[0].mlp.down, OverlappedRowLinear) == (chunks > 1)
        # under sequence parallelism, the all-gather side too: the linears reading a block's input
        assert isinstance(model.layers[0].attn.q, GatheredInputLinear) == (sp and chunks > 1)
        assert isinstance(model.layers[0].mlp.gate, GatheredInputLinear) == (sp and chunks > 1)
        summed = isinstance(model.layers[0].attn.k, HeadSliceLinear)
        assert summed == (tp == 4), tp
        assert isinstance(model.embed, VocabShardEmbedding) and isinstance(model.embed.weight, DTensor)
        assert not isinstance(model.lm_head.weight, DTensor), "a head without a vocab-parallel loss stays whole"
        assert not isinstance(model.layers[0].attn_norm.weight, DTensor)
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
        for step in range(3):
            micro = tiny_batches(2 if step == 1 else 1, batch_size=2, vocab_size=GQA.vocab_size, seed=20 + step)
            for opt in opts:
                opt.zero_grad()
            ref_loss = sum(reference(t, labels=y) for t, y in micro) / len(micro)
            ref_loss.backward()  # type: ignore[union-attr]
            losses = []
            for i, (t, y) in enumerate(micro):
                sync = layout.no_grad_sync() if i < len(micro) - 1 else _nothing()
                with sync:
                    loss = model(t, labels=y) / len(micro)
                    loss.backward()
                    losses.append(loss.detach())
            layout.finish_grad_sync()
            what = f"tp{tp}{' +sp' if sp else ''}{f' +overlap {chunks}' if chunks > 1 else ''} step {step}"
            assert_rel_close(sum(losses), ref_loss.detach(), 1e-5, name=f"{what}: loss")  # type: ignore[union-attr,arg-type]
            _check_grads(model, reference, what)
            norm = global_grad_norm(list(model.named_parameters()), _mesh(tp), [layout])
            assert_rel_close(norm, global_grad_norm(list(reference.parameters())), 1e-5, name=f"{what}: norm")
            for opt in opts:
                opt.step()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def case_vocab_parallel_loss_head() -> None:
    """A model with a vocab-parallel loss head: its output weight (lm_head, or the tied embedding) is
    split by rows and the head swapped; loss and gradients equal one process."""
    for tied in (False, True):
        reference = HeadedTiny(GQA, tied=tied)
        layout = TPLayout()
        model = layout.apply(copy.deepcopy(reference), _mesh(4))
        assert model.loss_head.group is not None, "the loss head was not swapped"
        output = model.embed.weight if tied else model.lm_head.weight
        assert isinstance(output, DTensor) and output.placements == (Shard(0),)
        tokens, labels = tiny_batches(1, batch_size=2, vocab_size=GQA.vocab_size, seed=30)[0]
        ref_loss = reference(tokens, labels=labels)
        ref_loss.backward()
        loss = model(tokens, labels=labels)
        loss.backward()
        layout.finish_grad_sync()
        assert_rel_close(loss.detach(), ref_loss.detach(), 1e-5, name=f"tied={tied}: loss")
        _check_grads(model, reference, f"tied={tied}")


CASES: list[Callable[[], None]] = [
    case_sgd_steps_equal_one_process,
    case_vocab_parallel_loss_head,
]


def _run_cases(names: list[str]) -> None:
    torch.manual_seed(0)
    for case in CASES:
        if case.__name__ in names:
            case()


def test_cases_on_four_processes() -> None:
    run_distributed(_run_cases, 4, [c.__name__ for c in CASES], timeout=240)


def _meta_init_equals_whole_build() -> None:
    """Built on meta, split by tp2 (one kv head: kept whole), then init_params: every full tensor
    equals the one-process build's, bit for bit."""
    with torch.device("meta"):
        meta = TinyTransformer(TinyConfig(fused=False, num_kv_heads=1), seed=0)
    plain = copy.deepcopy(meta)
    init_params(plain, seed=5, device="cpu")
    model = TPLayout().apply(meta, build_mesh(("tp",), {}, fill="tp", device_type="cpu"))
    assert all(p.is_meta or (isinstance(p, DTensor) and p.to_local().is_meta) for p in model.parameters())
    init_params(model, seed=5, device="cpu")
    want = dict(plain.named_parameters())
    placements = set()
    for name, p in model.named_parameters():
        placements.add(tuple(p.placements) if isinstance(p, DTensor) else (Replicate(),))
        assert torch.equal(_full(p.detach()), want[name]), name
    assert {(Shard(0),), (Shard(1),), (Replicate(),)} <= placements


def test_meta_init_equals_whole_build() -> None:
    run_distributed(_meta_init_equals_whole_build, 2, timeout=120)


# -- the run loop: saved under tp2, resumed on one process ------------------------------------------------------
STEPS, TOTAL = 3, 5


def _config(host: Any, out_dir: Path, corpus: str, *, layouts: list[str], resume: str = "none") -> RunConfig:
    parallel: dict[str, Any] = {"layouts": layouts}
    if layouts == ["tp"]:  # sequence parallelism on: the same checkpoint as plain tp, resumed without it on one rank
        parallel["tp"] = {"sequence_parallel": True}
    update = {"model": {"fused": False}, "parallel": parallel}
    return run_config(
        host, out_dir, corpus, update | {"train": {"steps": TOTAL, "global_batch_size": 4, "resume": resume}}
    )


def _tp2_run(root: str, corpus: str) -> None:
    host = make_host()
    run(_config(host, Path(root) / "tp2", corpus, layouts=["tp"]), host, stop_at_step=STEPS)
    dist.barrier()


def test_run_on_tp2_equals_one_process_and_resumes_on_one(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_tp2_run, 2, str(tmp_path), corpus, timeout=240)
    host = make_host()
    one = run(_config(host, tmp_path / "one", corpus, layouts=["single"]), host)
    two, ref = metrics(tmp_path / "tp2"), metrics(tmp_path / "one")
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    ckpt = tmp_path / "tp2" / "checkpoints" / f"step_{STEPS:08d}"
    resumed = run(_config(host, tmp_path / "resumed", corpus, layouts=["tp"], resume=str(ckpt)), host)
    assert resumed.start_step == STEPS
    for step in range(STEPS + 1, TOTAL + 1):
        assert resumed.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step


# -- no process group ---------------------------------------------------------------------------------------
def _sized(tp: int) -> ParallelMesh:
    """A mesh that only answers sizes: every size check runs before anything touches a process group."""
    return ParallelMesh(dim_names=("tp",), dim_sizes=(tp,), device_type="cpu")


class _Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyTransformer(TinyConfig(fused=False), seed=0)
        self.mix = nn.Parameter(torch.zeros(4, 4))


class _LoneKV(nn.Module):
    """A key projection with one head and no query projection split by heads beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(8, 4, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"k.weight": ParamSpec("matrix", head_rows=4, tp="column")}


@pytest.mark.parametrize(
    ("build", "tp", "match"),
    [
        (
            lambda: TinyTransformer(TinyConfig(), seed=0),
            2,
            r"'layers\.0\.attn\.qkv\.weight' \(role 'matrix'\) declares no tensor-parallel style; declare ParamSpec",
        ),
        (lambda: _Undeclared(), 2, r"'mix' \(role 'matrix'\) declares no tensor-parallel style"),
        (
            lambda: TinyTransformer(TinyConfig(fused=False, hidden_size=36, num_heads=6), seed=0),
            4,
            r"'layers\.0\.attn\.q\.weight' has 6 heads, which do not split over tp = 4; allowed: a tp size dividing 6 \(1, 2, 3, 6\)",
        ),
        (
            lambda: TinyTransformer(TinyConfig(fused=False, hidden_size=36, num_heads=6, num_kv_heads=3), seed=0),
            2,
            r"'layers\.0\.attn\.k\.weight' has 3 heads, which do not split over tp = 2",
        ),
        (
            lambda: TinyTransformer(TinyConfig(fused=False, ffn_size=50), seed=0),
            4,
            r"'layers\.0\.mlp\.gate\.weight' has 50 rows \(output features, dim 0\), which do not split over tp = 4; allowed: a tp size dividing 50 \(1, 2, 5, 10, 25, 50\)",
        ),
        (
            lambda: TinyTransformer(TinyConfig(fused=False, vocab_size=61), seed=0),
            2,
            r"'embed\.weight' has 61 rows \(vocabulary, dim 0\), which do not split over tp = 2",
        ),
        (lambda: _LoneKV(), 2, r"'k' has 1 heads for tp = 2 ranks and no sibling projection splits by heads"),
    ],
    ids=["fused-undeclared", "raw-matrix", "heads", "kv-heads", "ffn", "vocab", "lone-kv"],
)
def test_sizes_and_declarations_refused_before_anything_changes(
    build: Callable[[], nn.Module], tp: int, match: str
) -> None:
    model = build()
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match) as info:
        TPLayout().apply(model, _sized(tp))
    assert "\n" not in str(info.value)
    assert all(before[n] is p for n, p in model.named_parameters()), "a parameter changed before the error"


def test_sequence_parallel_config_and_run_checks() -> None:
    assert TPLayout.Config(sequence_parallel=True).sequence_parallel
    with pytest.raises(ValueError, match=r"sequence_parallel = 'yes'; allowed: true or false"):
        TPLayout.Config(sequence_parallel="yes")  # type: ignore[arg-type]
    run_cfg = SimpleNamespace(parallel=SimpleNamespace(sizes={"tp": 4}), train=SimpleNamespace(seq_len=18))
    with pytest.raises(
        ValueError, match=r"^train\.seq_len = 18 does not split over parallel\.sizes\.tp = 4 .* multiple of 4$"
    ):
        TPLayout.check_run(TPLayout.Config(sequence_parallel=True), run_cfg)
    TPLayout.check_run(TPLayout.Config(), run_cfg)  # without sequence parallelism any length
    run_cfg.train.seq_len = 16
    TPLayout.check_run(TPLayout.Config(sequence_parallel=True), run_cfg)
    assert TPLayout.Config(overlap_chunks=4).overlap_chunks == 4
    for bad in (0, 65, True, 2.0):
        with pytest.raises(
            ValueError, match=r"^parallel\.tp\.overlap_chunks = .*; allowed: an integer from 1 \(off\) to 64$"
        ):
            TPLayout.Config(overlap_chunks=bad)  # type: ignore[arg-type]
    assert TPLayout.Config().overlap_all_gather and not TPLayout.Config(overlap_all_gather=False).overlap_all_gather
    with pytest.raises(ValueError, match=r"^parallel\.tp\.overlap_all_gather = 'no'; allowed: true or false$"):
        TPLayout.Config(overlap_all_gather="no")  # type: ignore[arg-type]


class _MixerWithoutHeads(nn.Module):
    """A layer whose token mixer splits nothing over heads: it cannot run on a rank's tokens alone."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8, bias=False)
        self.mix = nn.Linear(8, 8, bias=False)
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "norm.weight": ParamSpec("norm", tp="replicate"),
            "mix.weight": ParamSpec("matrix", tp="replicate"),
            "up.weight": ParamSpec("matrix", tp="column"),
            "down.weight": ParamSpec("matrix", tp="row"),
        }


class _ColumnOnly(nn.Module):
    """A block that splits its outputs over the ranks and never sums them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"up.weight": ParamSpec("matrix", tp="column")}


class _Stack(nn.Module):
    def __init__(self, layer: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer] if layer is not None else [])
        self.extra = nn.Linear(8, 8, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"extra.weight": ParamSpec("matrix", tp="replicate")}


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: _Stack(_MixerWithoutHeads()),
            r"'layers\.0\.mix' is neither a block split over heads .*parameter 'layers\.0\.mix\.weight' has role 'matrix'",
        ),
        (lambda: _Stack(None), r"sequence_parallel needs the model's layers in a ModuleList named layers / blocks / h"),
        (
            lambda: _Stack(nn.Sequential(_ColumnOnly())),
            r"'layers\.0\.0' splits its outputs over the ranks but has no row-parallel linear",
        ),
    ],
    ids=["mixer-without-heads", "no-layers", "column-without-row"],
)
def test_sequence_parallel_refuses_what_cannot_run_on_token_shards(build: Callable[[], nn.Module], match: str) -> None:
    model = build()
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match) as info:
        TPLayout(TPLayout.Config(sequence_parallel=True)).apply(model, _sized(2))
    assert "\n" not in str(info.value)
    assert all(before[n] is p for n, p in model.named_parameters()), "a parameter changed before the error"


def test_registered_as_layout_tp() -> None:
    host = isolated_host(plugin)
    assert host.registry.names("layout").count("tp") == 1
    assert host.registry.load("layout", "tp") is TPLayout
    assert TPLayout.mesh_dims == ("tp",)


def test_tp1_keeps_the_plain_model() -> None:
    model = TinyTransformer(GQA, seed=0)
    before = [(n, p) for n, p in model.named_parameters()]
    layout = TPLayout()
    assert layout.apply(model, _sized(1)) is model
    assert [(n, p) for n, p in model.named_parameters()] == before
    assert type(model.embed) is nn.Embedding and layout.data_parallel().size == 1
    assert layout.plan.whole and layout.plan.colwise
