"""A hybrid ``gpt`` (``gdn``, ``mamba2`` and ``attention`` mixers, SwiGLU MLPs, an MLP-only layer) trains under
``tp``, ``fsdp`` and ``pp`` like one process.

The model mixes every kind of layer a Nemotron-H or Qwen3-Next stack has: ``gdn/swiglu`` (mcore-ssm's Gated
DeltaNet with grouped value heads), ``mamba2/none`` (a mixer-only layer), ``attention/swiglu`` and ``swiglu/none``
(an MLP-only layer: the MLP block in the mixer's place). Each case runs 2 steps of mcore-optim's ``adamw`` against
the same model on one process (fp32, rel 1e-5: the loss, every gradient as a full tensor, and every parameter after
the steps):

* ``tp`` (heads of every mixer split; ``mamba2`` groups split), with and without sequence parallelism;
* ``fsdp`` (each rank its half of every batch);
* ``pp`` with 2 stages (1F1B, 4 micro-batches; the recurrent layers on the first stage, attention and the MLP-only
  layer on the second);
* packed documents (``cu_seqlens``: no conv window and no recurrent state crosses a document);
* (``cp``, by a head-parallel all-to-all in the recurrent layers, is ``test_hybrid_cp.py``);
* meta-device construction through ``build_parts`` (blocks found in the registry): the ``fsdp`` shards gathered
  equal the one-process build bit for bit.

CI runs one spawned group of 2 gloo ranks: tp, tp + sequence parallelism on packed documents, fsdp and pp on packed
documents, the meta init. The cross product (each layout plain and packed, with and without sequence parallelism;
``tp`` x ``fsdp`` on 4 ranks) is ``slow``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.config import resolve_config
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols import BlockContext
from mcore.ragged import full_tensor
from mcore.train.build import build_parts, builds_on_meta
from mcore_fsdp.layout import FSDPLayout
from mcore_models.gpt import GPT, GPTConfig
from mcore_optim.adamw import AdamWFactory
from mcore_parallel.pp import PPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

VOCAB, SEQ, ROWS, STEPS = 128, 16, 4, 2
#: ``[model]`` of the hybrid: every head count divides by 2 and 4 ranks (``mamba2``: 8 heads in 4 groups)
MODEL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_layers": 4,
    "max_position_embeddings": 64,
    "layers": ["gdn/swiglu", "mamba2/none", "attention/swiglu", "swiglu/none"],
    "gdn": {"num_qk_heads": 4, "num_v_heads": 8, "head_k_dim": 8, "head_v_dim": 4, "chunk_size": 4},
    "mamba2": {"d_state": 8, "headdim": 8, "ngroups": 4, "chunk_size": 4},
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "swiglu": {"ffn_hidden_size": 48},
}
ADAMW = AdamWFactory.Config(lr=1e-3, eps=1e-6)


def _host() -> Any:
    plugins = ("mcore_models.plugin", "mcore_ssm.plugin", "mcore_fsdp.plugin", "mcore_parallel.plugin")
    return isolated_host(*plugins, "mcore_testing.plugin")


def _reference(**overrides: Any) -> GPT:
    """The hybrid on one process (blocks from the registry, as a run finds them), in float64: the layouts must
    reproduce it up to reduction order, and in fp32 the conv weights' gradients (sums over every token, with
    cancellation) already differ by ~1e-5 between summation orders on some CPUs; in float64 what is left is the
    parts that compute in fp32 on purpose (norm statistics, the loss), ~1e-6 at the second step."""
    host = _host()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_values({**MODEL, **overrides}), block_lookup=lambda name: host.load("block", name))
    return model.double()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(step: int, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g), torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def _ctx(packed: bool, rows: int) -> BlockContext:
    """Documents of 5, 11, 11 and 5 tokens per two rows (one across the row end; none across a pair of rows)."""
    if not packed:
        return BlockContext()
    bounds = [0] + [b + 2 * SEQ * k for k in range(rows // 2) for b in (5, 16, 27, 32)]
    return BlockContext(cu_seqlens=torch.tensor(bounds, dtype=torch.int32))


def _compare(what: str, model: nn.Module, reference: nn.Module, tol: float = 1e-5) -> None:
    ref = dict(reference.named_parameters())
    names = {n for n, _ in model.named_parameters()}
    assert names == set(ref), f"{what}: parameter names differ: {sorted(names ^ set(ref))}"
    for name, p in model.named_parameters():
        want = ref[name].grad
        assert p.grad is not None and want is not None, f"{what}: {name} has no gradient"
        assert_rel_close(_full(p.grad), want, tol, name=f"{what}: grad of {name}")


def _after_steps(what: str, model: nn.Module, reference: nn.Module) -> None:
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():  # Adam's first steps move every weight by ~lr: compare the weights
        assert_rel_close(_full(p.detach()), ref[name].detach(), 1e-5, name=f"{what}: {name} after {STEPS} steps")


# -- tp and fsdp ------------------------------------------------------------------------------------------
def _layouts(kind: str, sp: bool) -> tuple[list[Any], ParallelMesh]:
    """``kind``'s layouts in the order they apply (``tp x fsdp``: tp first, as ``["tp", "fsdp"]``) and the mesh."""
    tp = TPLayout(TPLayout.Config(sequence_parallel=sp))
    if kind == "tp":
        return [tp], build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    if kind == "fsdp":
        return [FSDPLayout()], build_mesh(("dp_shard",), {}, fill="dp_shard", device_type="cpu")
    assert kind == "tp x fsdp"
    return [tp, FSDPLayout()], build_mesh(("dp_shard", "tp"), {"tp": 2}, fill="dp_shard", device_type="cpu")


def _steps_equal_one_process(kind: str, *, packed: bool = False, sp: bool = False) -> None:
    what = f"{kind}{' +sp' if sp else ''}{' packed' if packed else ''}"
    reference = _reference()
    layouts, mesh = _layouts(kind, sp)
    model = copy.deepcopy(reference)
    for layout in layouts:
        model = layout.apply(model, mesh)
    tp = next((layout for layout in layouts if isinstance(layout, TPLayout)), None)
    if tp is not None:  # every mixer's heads split: this rank's share of the mamba2 decay rates and GDN's values
        assert isinstance(model.get_submodule("layers.1.attention.A_log").weight, DTensor), what
        if len(layouts) == 1:
            v: Any = model.get_submodule("layers.0.attention.v").weight  # 8 value heads of 4 dims: 4 heads a rank
            assert v.to_local().shape[0] == 16, what
    dp = layouts[-1].data_parallel()
    part = slice(dp.rank * ROWS // dp.size, (dp.rank + 1) * ROWS // dp.size)
    optimizers = [AdamWFactory(ADAMW).build(m, mesh=mesh, layouts=ls) for m, ls in ((reference, []), (model, layouts))]
    for step in range(STEPS):
        tokens, labels = _batch(step)
        ref_loss = reference(tokens, labels=labels, ctx=_ctx(packed, ROWS))
        ref_loss.backward()
        tokens, labels, view = tokens[part], labels[part], _ctx(packed, ROWS // dp.size)
        if tp is not None:  # tp's view of the batch (its head group; sequence parallelism: this rank's tokens)
            tokens, labels, view = tp.shard_batch(tokens, labels, view)
        loss = model(tokens, labels=labels, ctx=view)
        loss.backward()
        for layout in reversed(layouts):  # the run loop's order: fsdp's reductions, then tp's sums over them
            layout.finish_grad_sync()
        got = loss.detach().clone()
        if dp.size > 1:
            dist.all_reduce(got, group=dp.group)
            got /= dp.size
        assert_rel_close(got, ref_loss.detach(), 1e-5, name=f"{what}: loss of step {step}")
        _compare(f"{what} step {step}", model, reference)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    _after_steps(what, model, reference)


# -- pp -----------------------------------------------------------------------------------------------------
class _FP32:
    """The default recipe's behaviour: no autocast, the loss unscaled."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _pp_equals_one_process(packed: bool) -> None:
    what = f"pp2{' packed' if packed else ''}"
    reference = _reference()
    mesh = build_mesh(("pp",), {}, fill="pp", device_type="cpu")
    pp = PPLayout(PPLayout.Config(schedule="1f1b"))
    model = pp.apply(copy.deepcopy(reference), mesh)
    kinds = {type(m).__name__ for m in model.modules()}  # stage 0: gdn, mamba2; stage 1: attention, the MLP
    held = {"GatedDeltaNet", "Mamba2"} if mesh.rank("pp") == 0 else {"Attention", "SwiGLU"}
    assert held <= kinds and not (kinds & {"GatedDeltaNet", "Mamba2", "Attention"}) - held, (what, kinds)
    optimizers = [AdamWFactory(ADAMW).build(m, mesh=mesh, layouts=ls) for m, ls in ((reference, []), (model, [pp]))]
    count = 4
    for step in range(STEPS):
        batches = [_batch(10 * step + i, rows=2) for i in range(count)]
        want = torch.zeros(())
        for tokens, labels in batches:
            loss = reference(tokens, labels=labels, ctx=_ctx(packed, 2))
            (loss / count).backward()
            want += loss.detach() / count
        local = [(t, y, _ctx(packed, 2)) for t, y in batches]
        got = pp.forward_backward(model, local, precision=_FP32(), no_grad_sync=contextlib.nullcontext)
        pp.finish_grad_sync()
        assert_rel_close(got, want, 1e-5, name=f"{what} step {step}: loss")
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None and ref[name].grad is not None, f"{what}: {name} has no gradient"
            assert_rel_close(p.grad, ref[name].grad, 1e-5, name=f"{what} step {step}: grad of {name}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    _after_steps(what, model, reference)


# -- meta-device construction ---------------------------------------------------------------------------------
def _run_config(parallel: dict[str, Any] | None = None) -> Any:
    raw = {
        "model": {"name": "gpt", **MODEL},
        "optimizer": {"name": "reference-adamw"},
        "train": {"seed": 5, "seq_len": SEQ},
        "parallel": {"device": "cpu", **(parallel or {})},
    }
    return resolve_config(raw, _host())


def _meta_init(ref_path: str) -> None:
    ref = torch.load(ref_path, weights_only=True)
    config = _run_config({"layouts": ["fsdp"]})
    assert builds_on_meta(config.model.implementation.load(), [s.instantiate() for s in config.layouts])
    model = build_parts(config, _host()).model
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    assert state.keys() == ref.keys()
    for key, value in state.items():
        assert torch.equal(value, ref[key]), f"meta init under fsdp2: {key}"  # bit for bit


# -- the groups ---------------------------------------------------------------------------------------------
def _ci(ref_path: str) -> None:
    _steps_equal_one_process("tp")
    _steps_equal_one_process("tp", sp=True, packed=True)
    _steps_equal_one_process("fsdp", packed=True)
    _pp_equals_one_process(packed=True)
    _meta_init(ref_path)


def _cross_product() -> None:
    for packed in (False, True):
        _steps_equal_one_process("tp", packed=packed)
        _steps_equal_one_process("tp", packed=packed, sp=True)
        _steps_equal_one_process("fsdp", packed=packed)
        _pp_equals_one_process(packed)


def test_hybrid_gpt_trains_under_tp_fsdp_pp_like_one_process(tmp_path: Path) -> None:
    model = build_parts(_run_config(), _host()).model  # one process, built on meta too
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("layers.1.attention.A_log") for k in state)
    ref_path = tmp_path / "ref.pt"
    torch.save(state, ref_path)
    run_distributed(_ci, 2, str(ref_path), timeout=300)


def _tp_fsdp() -> None:
    for packed in (False, True):
        for sp in (False, True):
            _steps_equal_one_process("tp x fsdp", packed=packed, sp=sp)


@pytest.mark.slow
def test_hybrid_gpt_every_layout_and_variant() -> None:
    run_distributed(_cross_product, 2, timeout=900)


@pytest.mark.slow
def test_hybrid_gpt_tp2_fsdp2_like_one_process() -> None:
    run_distributed(_tp_fsdp, 4, timeout=900)
