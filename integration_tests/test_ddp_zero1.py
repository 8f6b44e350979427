"""ZeRO-1 through the run loop: ``parallel.layouts = ["ddp"]`` (mcore-parallel) with ``distributed-adamw``
(mcore-optim), which meet only in the core's handshake (``mcore.protocols.sharded_grads``), on 2 gloo processes.

* gpt ``tiny`` (mcore-models) in fp32, two micro-batches per rank, clipping on: loss of every step and the
  parameters after step 3 equal one process with plain ``adamw`` (rel 1e-5);
* inside the run loop, before every update: the optimizer is ``zero_pieces.PiecesAdamW`` and each rank's ``.grad``
  is zero outside the pieces it owns (``ddp`` reduce-scattered rather than all-reduced); each rank holds the
  moments of its pieces only (about half of them), and the ranks' pieces add up to the model;
* the step-3 checkpoint (moments saved flat, row-ragged over the two ranks) resumes on 2 ranks bit for bit (step 4's
  loss and parameters), and loads on one process (``distributed-adamw``, there plain ``adamw``) and on 2 ranks under
  ``ddp`` with plain ``adamw`` (replicated state), each giving step 4's loss (rel 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from run_helpers import merged, metrics, run_update, stdlib_corpus

from mcore.config import RunConfig, resolve_config
from mcore.plugins import hookimpl
from mcore.train import run
from mcore_optim.distributed_adamw import DistributedAdamWFactory
from mcore_optim.zero_pieces import PiecesAdamW
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),  # DCP read in one process
]

CUT, TOTAL = 3, 4  # compared to one process up to CUT; the checkpoint of step CUT resumes step TOTAL
BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny", "max_position_embeddings": 64},
    "optimizer": {"name": "distributed-adamw", "lr": 3e-3, "eps": 1e-6},
    "train": {
        "steps": TOTAL,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,  # 2 micro-batches per rank on 2 ranks, 4 on one
        "warmup_steps": 1,
        "grad_clip": 0.5,
        "deterministic": True,
        "cpu_threads": 1,
        "resume": "none",
    },
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "save_final": True},
}
DDP = {"layouts": ["ddp"], "ddp": {"bucket_mb": 0.05}}  # several buckets, each split between the two ranks
SINGLE = {"layouts": ["single"]}

#: What the probe saw on this process (each rank records its own).
CHECKS: list[dict[str, Any]] = []


class ProbeFactory(DistributedAdamWFactory):
    """``distributed-adamw`` whose optimizer, before each update, checks that the gradients were reduce-scattered."""

    def build(self, model: Any, *, mesh: Any, layouts: Any) -> Any:
        optimizer = super().build(model, mesh=mesh, layouts=layouts)
        assert isinstance(optimizer, PiecesAdamW), f"distributed-adamw under ddp built {type(optimizer).__name__}"
        shards = optimizer.shards
        moments = sum(
            v.to_local().numel() for e in optimizer.state_dict()["state"].values() for k, v in e.items() if k != "step"
        )
        total = sum(p.numel() for p in model.parameters())
        CHECKS.append({"owned": shards.numel, "total": total, "moments": moments, "steps": 0})
        inner = optimizer._update

        def checked_update(*args: Any, **kwargs: Any) -> None:
            owned_grad = 0.0
            for piece in shards.pieces:
                grad = piece.param.grad
                assert grad is not None, piece.name
                flat = grad.detach().view(-1)
                outside = torch.cat([flat[: piece.start], flat[piece.stop :]])
                assert not outside.any(), f"{piece.name}: .grad is not zero outside this rank's piece"
                owned_grad += float(piece.grad().abs().sum())
            assert owned_grad > 0, "no gradient on the pieces this rank owns: the check above proves nothing"
            CHECKS[-1]["steps"] += 1
            inner(*args, **kwargs)

        optimizer._update = checked_update  # type: ignore[method-assign]
        return optimizer


class ProbePlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("optimizer", "probe-distributed-adamw", ProbeFactory, summary="tests: distributed-adamw, probed")


def _host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_optim.plugin", "mcore_parallel.plugin", ProbePlugin())


def _config(out_dir: Path, corpus: str, parallel: dict[str, Any], optimizer: str, resume: str = "none") -> RunConfig:
    update = merged(
        run_update(out_dir, corpus, parallel, {"resume": resume}, every=CUT), {"optimizer": {"name": optimizer}}
    )
    return resolve_config(merged(BASE, update), _host())


def _checkpoint(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of checkpoint ``path``, whole, read in this process."""
    reader = dcp.FileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items() if k.startswith("model/")}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def _two_ranks(root: str, corpus: str) -> None:
    root_path, host = Path(root), _host()
    full = run(_config(root_path / "zero", corpus, DDP, "probe-distributed-adamw"), host)
    assert full.steps_done == TOTAL
    ckpt = str(_checkpoint(root_path / "zero", CUT))
    resumed = run(_config(root_path / "resumed", corpus, DDP, "probe-distributed-adamw", ckpt), host)
    plain = run(_config(root_path / "plain", corpus, DDP, "adamw", ckpt), host)
    assert resumed.start_step == plain.start_step == CUT
    assert [c["steps"] for c in CHECKS] == [TOTAL, TOTAL - CUT], CHECKS  # the probe ran before every update
    for seen in CHECKS:  # each rank holds the moments of its own pieces only: about half of them
        assert seen["moments"] == 2 * seen["owned"], seen
        assert 0.4 * seen["total"] < seen["owned"] < 0.6 * seen["total"], seen
    owned = torch.tensor([CHECKS[0]["owned"]])
    dist.all_reduce(owned)
    assert int(owned) == CHECKS[0]["total"], "the ranks' pieces do not add up to the model"
    if dist.get_rank() == 0:
        losses = {"resumed": resumed.losses, "plain": plain.losses}
        (root_path / "losses.json").write_text(json.dumps(losses))


def test_ddp_zero1_equals_one_process_and_its_checkpoint_moves(tmp_path: Path) -> None:
    corpus = stdlib_corpus(tmp_path)
    run_distributed(_two_ranks, 2, str(tmp_path), corpus, timeout=600)
    host = _host()
    run(_config(tmp_path / "one", corpus, SINGLE, "adamw"), host)
    zero, ref = metrics(tmp_path / "zero"), metrics(tmp_path / "one")
    for step in range(1, TOTAL + 1):
        for key in ("loss", "grad_norm"):
            assert zero[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    assert max(zero[step]["grad_norm"] for step in zero) > BASE["train"]["grad_clip"], "clipping never clipped"
    ours, theirs = (
        _model_tensors(_checkpoint(tmp_path / "zero", CUT)),
        _model_tensors(_checkpoint(tmp_path / "one", CUT)),
    )
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        rel = float((ours[name] - value).norm() / value.norm())
        assert rel < 1e-5, f"step {CUT}: {name} differs from one process by {rel:.2e}"

    raw = json.loads((tmp_path / "losses.json").read_text())
    losses = {name: {int(s): v for s, v in d.items()} for name, d in raw.items()}
    assert losses["resumed"][TOTAL] == zero[TOTAL]["loss"]  # bit for bit
    final, again = (
        _model_tensors(_checkpoint(tmp_path / "zero", TOTAL)),
        _model_tensors(_checkpoint(tmp_path / "resumed", TOTAL)),
    )
    assert all(torch.equal(final[k], again[k]) for k in final), "the resumed run's parameters differ"
    assert losses["plain"][TOTAL] == pytest.approx(zero[TOTAL]["loss"], rel=1e-5)
    ckpt = str(_checkpoint(tmp_path / "zero", CUT))
    alone = run(_config(tmp_path / "alone", corpus, SINGLE, "distributed-adamw", ckpt), host)
    assert alone.start_step == CUT
    assert alone.losses[TOTAL] == pytest.approx(zero[TOTAL]["loss"], rel=1e-5)
