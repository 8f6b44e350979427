"""``cp`` on the real ``gpt`` model: cp2, cp4, cp2 x tp2 and cp2 x fsdp, every kind, equal one process.

One spawned group of 4 gloo ranks runs cp4 over all of them, cp2 twice side by side (a
``dp_replicate`` dimension of 2 that nothing reads), cp2 x tp2 (``tp`` applied first, as
``parallel.layouts = ["tp", "cp"]`` does), cp2 x fsdp2 with fsdp borrowing ``cp`` (``[parallel.fsdp]
borrow = ["cp"]``: every parameter sharded over dp_shard x cp, one reduce-scatter that sums the cp
ranks and divides by dp_shard; both dp ranks read the same batch here) and ``["tp", "cp", "fsdp"]``
borrowing likewise (dp_shard 1). Each case trains 3 SGD steps of a ``gpt`` ``tiny`` variant
from the batch the layouts' ``shard_batch`` make (as the run loop does, the loss group in the
context) and checks the loss and every gradient against one process (fp32, rel 1e-5) at every
step: GQA, MLA (value head dim != query/key head dim), a sliding window, multi-token prediction
(1 and 2 depths, reading the row ahead through ``MTP_AHEAD``), and packed documents of
mixed lengths, one across a row end (each split zig-zag on its own, padded to a multiple of
``2 * cp``), and full activation recompute (the ring runs again in backward). ``a2a`` (Ulysses)
also with as many key/value heads as cp4 (``mha``) and fewer (``gqa`` under cp4, and under cp2 x tp2:
one per tp rank), each rank then taking the key/value head its query heads read; ``a2a+ring`` on cp4
as all-to-all pairs in a ring of 2; query heads that do not divide by cp (``a2a``) or ``a2a_size``
(``a2a+ring``) are refused in one line, as are fsdp borrowing anything but ``cp``, borrowing it without
a ``cp`` layout, and ``hsdp`` borrowing. The fast test runs a representative set; the whole cross
product is ``slow``.

The run loop: ``["cp", "fsdp"]`` (cp2 x fsdp2) on 4 processes trains ``tiny`` on packed rows like
one process (loss and gradient norm of 5 steps, AdamW, two micro-batches per rank, clipping
active), fsdp borrowing ``cp`` (fast) or sharding over ``dp_shard`` only (slow), and its step-3
checkpoint resumes under ``fsdp4`` with the one-process losses.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from run_helpers import merged, metrics, run_update
from torch.distributed.tensor import DTensor

from mcore.config import resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.errors import ConfigError, UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols import BlockContext
from mcore.train import run
from mcore.train.build import build_parts
from mcore.train.recompute import apply_recompute
from mcore_fsdp.layout import FSDPLayout
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_parallel.cp import CPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},  # the tiny preset: 4 query heads, 2 key/value heads
    "mla": {"mixer": "mla", "mla": {"num_heads": 4}},
    "window": {"attention": {"sliding_window": 5}},
    "mha": {"attention": {"num_kv_heads": 4}},  # as many key/value heads as cp4
}
#: multi-token prediction: depth d reads the row d tokens ahead, which the layout hands over (``MTP_AHEAD``)
MTP_VARIANTS: dict[str, dict[str, Any]] = {"mtp1": {"mtp_num_layers": 1}, "mtp2": {"mtp_num_layers": 2}}
SEQ, STEPS = 16, 3
PACKED = [0, 5, 16, 27, 32]  # documents of 5, 11, 11 (across the row end) and 5 tokens over 2 rows of 16
#: dynamic CP's second step: the 23-token document is cut at the row end into spans of 12 and 11 tokens, each
#: split over a pair of ranks under cp4; the 3-, 1- and 5-token documents stay whole on one rank each
PACKED_LONG = [0, 3, 4, 27, 32]


def _mesh(key: str) -> ParallelMesh:
    key = key.removesuffix(" +recompute")
    if key == "cp4":
        return build_mesh(("cp",), {}, fill="cp", device_type="cpu")
    if key == "cp2 x tp2":
        return build_mesh(("cp", "tp"), {"tp": 2}, fill="cp", device_type="cpu")
    if key == "cp2 x fsdp2":
        return build_mesh(("dp_shard", "cp"), {"cp": 2}, fill="dp_shard", device_type="cpu")
    if key == "cp2 x tp2 x fsdp":  # fsdp over dp_shard (1) x cp of tp's local tensors
        return build_mesh(("dp_shard", "cp", "tp"), {"cp": 2, "tp": 2}, fill="dp_shard", device_type="cpu")
    return build_mesh(("dp_replicate", "cp"), {"cp": 2}, fill="dp_replicate", device_type="cpu")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check(key: str, kind: str, variant: str, packed: bool, mesh: ParallelMesh) -> None:
    name = f"{key} {kind} {variant}{' packed' if packed else ''}"
    torch.manual_seed(0)
    options = VARIANTS[variant] if variant in VARIANTS else MTP_VARIANTS[variant]
    reference = GPT(preset_config("tiny", vocab_size=128, max_position_embeddings=64, **options))
    model = copy.deepcopy(reference)
    if key.endswith("+recompute"):  # the ring runs again in backward: every rank in the same order
        apply_recompute(model, "full")
    layouts: list[Any] = [TPLayout()] if "tp" in key else []  # the run's order: tp, then cp
    kind, _, dynamic = kind.partition(" ")  # "allgather dynamic" / "ring dynamic-work": dynamic CP with that kind
    balance = "work" if dynamic == "dynamic-work" else "tokens"
    a2a_size = 2 if kind == "a2a+ring" else None
    layout = CPLayout(CPLayout.Config(kind=kind, a2a_size=a2a_size, dynamic=bool(dynamic), dynamic_balance=balance))
    layouts.append(layout)
    if "fsdp" in key:  # fsdp sharding every parameter over dp_shard x cp (both dp ranks read the same batch here)
        layouts.append(FSDPLayout(FSDPLayout.Config(borrow=("cp",))))
    for each in layouts:
        model = each.apply(model, mesh)
    if "fsdp" in key:
        assert all(p.device_mesh.mesh_dim_names[0] == "dp_shard_cp" for p in model.parameters()), name
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(0, 128, (2, SEQ), generator=g)
        labels = torch.randint(0, 128, (2, SEQ), generator=g)
        labels[0, : 3 + step] = -100

        documents = PACKED_LONG if dynamic and step == 1 else PACKED

        def ctx(documents: list[int] = documents) -> BlockContext:
            return BlockContext(cu_seqlens=torch.tensor(documents, dtype=torch.int32)) if packed else BlockContext()

        for opt in opts:
            opt.zero_grad()
        ref_loss = reference(tokens, labels=labels, ctx=ctx())
        ref_loss.backward()
        local_tokens, local_labels, view = tokens, labels, ctx()
        for each in layouts:
            if hasattr(each, "shard_batch"):
                local_tokens, local_labels, view = each.shard_batch(local_tokens, local_labels, view)
        assert view.loss_group is not None and local_tokens.numel() < tokens.numel(), name
        assert view.attention is not None and view.attention.name == f"cp-{kind}", name
        loss = model(local_tokens, labels=local_labels, ctx=view)
        loss.backward()
        for each in reversed(layouts):
            each.finish_grad_sync()
        total = loss.detach().clone()
        dist.all_reduce(total, group=layout.loss_group())  # the ranks' losses add up
        assert_rel_close(total, ref_loss.detach(), 1e-5, name=f"{name} step {step}: loss")
        ref = dict(reference.named_parameters())
        for pname, p in model.named_parameters():
            want = ref[pname].grad
            assert p.grad is not None and want is not None, f"{name}: {pname} has no gradient"
            assert_rel_close(_full(p.grad), want, 1e-5, name=f"{name} step {step}: grad of {pname}")
        for opt in opts:
            opt.step()


def _check_a2a_refuses_heads_not_divisible_by_cp(mesh: ParallelMesh) -> None:
    """Query heads that do not split over cp4 (``a2a``) or ``a2a_size`` 2 (``a2a+ring``): one line naming the
    heads, the size and what would work, on every rank."""
    refusals = {
        ("a2a", 2): r"parallel\.sizes\.cp = 4, but the attention has 2 query heads .*allowed: a cp dividing 2 \(2\)",
        ("a2a+ring", 1): r"parallel\.cp\.a2a_size = 2, but the attention has 1 query heads .*allowed: "
        r"parallel\.cp\.a2a_size dividing 1 \(none above 1\)",
    }
    for (kind, heads), pattern in refusals.items():
        model = GPT(preset_config("tiny", vocab_size=128, attention={"num_heads": heads, "num_kv_heads": 1}))
        layout = CPLayout(CPLayout.Config(kind=kind, a2a_size=2 if kind == "a2a+ring" else None))
        model = layout.apply(model, mesh)
        tokens = torch.zeros(1, SEQ, dtype=torch.int64)
        local_tokens, local_labels, view = layout.shard_batch(tokens, tokens, BlockContext())
        with pytest.raises(UserError) as info:
            model(local_tokens, labels=local_labels, ctx=view)
        message = str(info.value)
        assert "\n" not in message and re.search(
            rf"parallel\.cp\.kind = '{re.escape(kind)}' .*{pattern}, or parallel\.cp\.kind = 'ring' or 'allgather'$",
            message,
        ), message


def _run(cases: list[tuple[str, str, str, bool]], check_errors: bool = False) -> None:
    meshes = {key: _mesh(key) for key in sorted({c[0].removesuffix(" +recompute") for c in cases} | {"cp4"})}
    if check_errors:
        _check_a2a_refuses_heads_not_divisible_by_cp(meshes["cp4"])
    for key, kind, variant, packed in cases:
        _check(key, kind, variant, packed, meshes[key.removesuffix(" +recompute")])


FAST = [
    ("cp2", "ring", "gqa", False),
    ("cp2", "allgather", "mla", False),
    ("cp4", "ring", "mla", False),
    ("cp4", "allgather", "gqa", False),
    ("cp2", "ring", "gqa", True),
    ("cp4", "ring", "window", True),
    ("cp2 x tp2", "ring", "mla", True),
    ("cp2 +recompute", "ring", "gqa", True),
    ("cp4", "a2a", "gqa", True),  # 2 key/value heads < cp: each rank takes the one its query heads read
    ("cp2", "a2a", "mla", False),
    ("cp2 x fsdp2", "ring", "gqa", True),  # fsdp over dp_shard x cp: its reduce-scatter sums cp, divides by dp_shard
    ("cp4", "a2a+ring", "gqa", True),  # all-to-all inside pairs of ranks, a ring of 2 across them
    ("cp2", "ring", "mtp1", True),  # MTP reads the row ahead: the layout hands it this rank's tokens/labels
    ("cp4", "allgather dynamic", "gqa", True),  # dynamic CP: documents over 1, 2 or 4 ranks, one row per rank
    ("cp2 x fsdp2", "allgather dynamic", "mla", True),  # ... under fsdp (one forward per micro-batch on every rank)
    ("cp4", "ring dynamic-work", "window", True),  # balancing tokens plus causal pairs
]
ALL = [
    (key, kind, variant, packed)
    for key in ("cp2", "cp4", "cp2 x tp2", "cp2 x fsdp2", "cp2 x tp2 x fsdp")
    for kind in ("ring", "allgather")
    for variant in ("gqa", "mla", "window")
    for packed in (False, True)
]
ALL_A2A = [
    (key, "a2a", variant, packed)
    for key in ("cp2", "cp4", "cp2 x tp2", "cp2 +recompute")
    for variant in VARIANTS
    for packed in (False, True)
]


ALL_MTP = [
    (key, kind, variant, packed)
    for key in ("cp2", "cp4", "cp2 x tp2", "cp2 +recompute")
    for kind in ("ring", "a2a")
    for variant in MTP_VARIANTS
    for packed in (False, True)
]
ALL_HYBRID = [("cp4", "a2a+ring", variant, packed) for variant in VARIANTS for packed in (False, True)]
ALL_DYNAMIC = [
    (key, f"{kind} {balance}", variant, packed)
    for key in ("cp2", "cp4", "cp2 x tp2", "cp2 x fsdp2", "cp2 +recompute")
    for kind in ("ring", "allgather", "a2a")
    for balance in ("dynamic", "dynamic-work")
    for variant in ("gqa", "mla", "window", "mtp1")
    for packed in (False, True)
]


def test_cp_gpt_equals_one_process() -> None:
    run_distributed(_run, 4, FAST, True, timeout=300)


@pytest.mark.slow
def test_cp_gpt_every_case_equals_one_process() -> None:
    run_distributed(_run, 4, [c for c in ALL if c not in FAST], timeout=600)


@pytest.mark.slow
def test_cp_gpt_every_a2a_case_equals_one_process() -> None:
    run_distributed(_run, 4, [c for c in ALL_A2A + ALL_HYBRID if c not in FAST], timeout=600)


@pytest.mark.slow
def test_cp_gpt_every_dynamic_case_equals_one_process() -> None:
    run_distributed(_run, 4, [c for c in ALL_DYNAMIC if c not in FAST], timeout=600)


@pytest.mark.slow
def test_cp_gpt_every_mtp_case_equals_one_process() -> None:
    run_distributed(_run, 4, [c for c in ALL_MTP if c not in FAST], timeout=600)


# -- the run loop: cp2 x fsdp2 on 4 processes, packed rows, a checkpoint resumed under fsdp4 ---------------------
CUT, TOTAL = 3, 5
RUN_BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny", "max_position_embeddings": 64},
    "optimizer": {"name": "adamw", "lr": 3e-3, "eps": 1e-6},
    "train": {
        "steps": TOTAL,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,  # 2 micro-batches per data-parallel rank under cp2 x fsdp2
        "warmup_steps": 1,
        "grad_clip": 0.5,
        "deterministic": True,
        "cpu_threads": 1,
        "resume": "none",
    },
    "data": {"workers": 0},  # packing 'thd': documents split on their own, padded to a multiple of 2 * cp
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "save_final": True},
}
CP_FSDP = {"layouts": ["cp", "fsdp"], "sizes": {"cp": 2}, "cp": {"kind": "ring"}}
#: fsdp sharding over dp_shard x cp (torchtitan's borrowing): one reduce-scatter over the 4 ranks, divided by dp_shard
CP_FSDP_BORROW = {**CP_FSDP, "fsdp": {"borrow": ["cp"]}}


def _host() -> Any:
    plugins = ("mcore_models.plugin", "mcore_optim.plugin", "mcore_parallel.plugin", "mcore_fsdp.plugin")
    return isolated_host(*plugins)


def _config(out_dir: Path, corpus: str, parallel: dict[str, Any], train: dict[str, Any] | None = None) -> Any:
    return resolve_config(merged(RUN_BASE, run_update(out_dir, corpus, parallel, train, every=CUT)), _host())


def _four_ranks(root: str, corpus: str, parallel: dict[str, Any]) -> None:
    root_path, host = Path(root), _host()
    run(_config(root_path / "cp_fsdp", corpus, parallel), host)
    ckpt = root_path / "cp_fsdp" / "checkpoints" / f"step_{CUT:08d}"
    resumed = run(_config(root_path / "fsdp4", corpus, {"layouts": ["fsdp"]}, {"resume": str(ckpt)}), host)
    assert resumed.start_step == CUT
    dist.barrier()


@pytest.mark.parametrize(
    "parallel",
    [
        pytest.param(CP_FSDP_BORROW, id="fsdp-over-dp_shard-x-cp"),
        pytest.param(CP_FSDP, id="fsdp-over-dp_shard", marks=pytest.mark.slow),
    ],
)
def test_run_cp2_fsdp2_equals_one_process_and_resumes_under_fsdp4(tmp_path: Path, parallel: dict[str, Any]) -> None:
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=30_000)
    run_distributed(_four_ranks, 4, str(tmp_path), str(corpus), parallel, timeout=600)
    run(_config(tmp_path / "one", str(corpus), {"layouts": ["single"]}), _host())
    ref, four, resumed = (metrics(tmp_path / name) for name in ("one", "cp_fsdp", "fsdp4"))
    for step in range(1, TOTAL + 1):
        for key in ("loss", "grad_norm"):
            assert four[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    for step in range(CUT + 1, TOTAL + 1):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step


def test_fsdp_borrows_only_cp_and_only_with_a_cp_layout(tmp_path: Path) -> None:
    """``[parallel.fsdp] borrow``: only ``cp`` or ``ep``; the core refuses it without a layout owning ``cp``; ``hsdp``
    does not borrow yet. Each a one-line error."""
    with pytest.raises(ValueError, match=r"^parallel\.fsdp\.borrow = \['tp'\]; allowed: \[\], \['cp'\] or \['ep'\]$"):
        FSDPLayout.Config(borrow=("tp",))
    alone = _config(tmp_path / "a", str(tmp_path / "corpus"), {"layouts": ["fsdp"], "fsdp": {"borrow": ["cp"]}})
    with pytest.raises(ConfigError, match=r"layout 'fsdp' works over mesh dimension 'cp', which no other layout owns"):
        build_parts(alone, _host())
    hybrid = {"layouts": ["cp", "hsdp"], "hsdp": {"borrow": ["cp"]}}
    with pytest.raises(ConfigError) as info:
        build_parts(_config(tmp_path / "b", str(tmp_path / "corpus"), hybrid), _host())
    assert "\n" not in str(info.value) and re.search(
        r"layout 'hsdp' cannot apply: parallel\.hsdp\.borrow = \['cp'\]: hsdp does not shard over other layouts' "
        r"dimensions yet; allowed: \[\]",
        str(info.value),
    ), str(info.value)
