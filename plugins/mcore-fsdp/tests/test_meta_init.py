"""Meta-device construction under ``fsdp``/``hsdp`` on 4 gloo ranks (one spawned group).

The model factory says ``supports_meta_init``, so ``build_parts`` builds on meta, ``fsdp``
shards the meta model (allocating only each rank's rows) and ``mcore.construct.init_params``
fills them. The gathered full state dict equals, bit for bit, the one-process build's, for
``fsdp`` over 4 ranks, ``hsdp`` 2x2 (rows split over 2 ranks; in bf16 too) and ``fsdp`` with
matrices kept whole (row-ragged DTensors); no rank ever allocates a sharded parameter's full
shape; column shards (``Shard(1)``, uneven, and ``(Shard(0), Shard(1))`` on a 2-D mesh) are
filled alone with the full tensor's values; an undeclared sharded parameter is a one-line
``UserError`` on every rank.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mcore.config import resolve_config
from mcore.construct import init_params
from mcore.errors import UserError
from mcore.init_rng import key_for, normal_, uniform_
from mcore.params import Init, ParamSpec
from mcore.plugins import hookimpl
from mcore.ragged import full_tensor
from mcore.train.build import build_parts
from mcore_fsdp.layout import FSDPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyModelFactory, TinyTransformer

SEED = 11
#: dimensions that do not divide 2 or 4 (vocab 61 rows, qkv 108, gate_up 100, down 36 x 50), and no
#: parameter whose full shape is another one's local shape (the allocation check tells them apart)
MODEL = {"name": "meta-tiny", "vocab_size": 61, "hidden_size": 36, "ffn_size": 50, "max_seq_len": 20}
RAW: dict[str, Any] = {
    "model": MODEL,
    "optimizer": {"name": "reference-adamw"},
    "train": {"seed": SEED},
    "parallel": {"device": "cpu"},
}
CASES: dict[str, dict[str, Any]] = {  # name: (parallel section, precision recipe)
    "fsdp4": {"parallel": {"device": "cpu", "layouts": ["fsdp"]}},
    "hsdp2x2-bf16": {
        "parallel": {"device": "cpu", "layouts": ["hsdp"], "sizes": {"dp_replicate": 2, "dp_shard": 2}},
        "precision": {"recipe": "bf16"},
    },
    "fsdp4-whole": {"parallel": {"device": "cpu", "layouts": ["fsdp"], "fsdp": {"whole_params": "matrices"}}},
}
TOKENS = torch.arange(2 * 12).reshape(2, 12) * 7 % 61


class MetaTiny(TinyModelFactory):
    """``reference-tiny`` that may be built on the meta device (its modules declare every init)."""

    supports_meta_init = True

    @staticmethod
    def build(config: TinyConfig, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> nn.Module:
        if str(device) != "meta":
            raise AssertionError(f"built on {device}: the meta path was not taken")
        with torch.device("meta"):
            return TinyTransformer(config, seed=seed)


class MetaTinyPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("model", "meta-tiny", MetaTiny)


def _host() -> Any:
    return isolated_host("mcore_fsdp.plugin", "mcore_testing.plugin", MetaTinyPlugin())


def _config(case: dict[str, Any]) -> Any:
    return resolve_config({**copy.deepcopy(RAW), **copy.deepcopy(case)}, _host())


def _plain(t: Any) -> bool:
    return type(t) is torch.Tensor and not t.is_meta


class Allocations(TorchDispatchMode):
    """Shapes of the new tensors operations return: plain ones (not meta, not DTensors) whose
    memory is none of the inputs' (views of a rank's flat shard are not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _plain(t)}
        for t in tree_leaves(out):
            if _plain(t) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


def _reference(precision: str) -> dict[str, Any]:
    """The one-process build (layout ``single``): full state dict and the loss on ``TOKENS``."""
    parts = build_parts(_config({"precision": {"recipe": precision}}), _host())
    state = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    return {"state": state, "loss": parts.model(TOKENS, labels=TOKENS).detach()}


class Columns(nn.Module):
    """Parameters a layout may split by columns (torch's tensor parallelism does)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(7, 10))
        self.v = nn.Parameter(torch.empty(3, 5, 6))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "w": ParamSpec("matrix", init=Init("normal", std=0.02)),
            "v": ParamSpec("matrix", init=Init("uniform", a=-1.0, b=1.0)),
        }


def _shard_meta(module: nn.Module, name: str, mesh: Any, placements: tuple[Any, ...]) -> None:
    """Replace ``module.<name>`` (on meta) by a meta DTensor parameter split as DTensor splits it."""
    full = getattr(module, name)
    local_shape, _ = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = torch.empty(local_shape, device="meta")
    dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())
    setattr(module, name, nn.Parameter(dt))


def _column_shards() -> None:
    rank = dist.get_rank()
    mesh1, mesh2 = init_device_mesh("cpu", (4,)), init_device_mesh("cpu", (2, 2))
    for mesh, w_place, v_place in (
        (mesh1, (Shard(1),), (Shard(2),)),  # 10 columns over 4 ranks: 3, 3, 3, 1; 6 over 4: 2, 2, 2, 0
        (mesh2, (Shard(0), Shard(1)), (Shard(1), Shard(2))),
    ):
        with torch.device("meta"):
            model = Columns()
        _shard_meta(model, "w", mesh, w_place)
        _shard_meta(model, "v", mesh, v_place)
        init_params(model, seed=SEED, device="cpu")
        w_whole = normal_(torch.empty(7, 10), key_for(SEED, "w"), std=0.02)
        v_whole = uniform_(torch.empty(3, 5, 6), key_for(SEED, "v"), low=-1.0, high=1.0)
        assert torch.equal(model.w.full_tensor(), w_whole) and torch.equal(model.v.full_tensor(), v_whole)
        if len(w_place) == 1:  # this rank's own columns, before any gather
            first = 3 * rank
            assert torch.equal(model.w.to_local(), w_whole[:, first : first + (1 if rank == 3 else 3)])


def _cases(ref_path: str) -> None:
    refs = torch.load(ref_path, weights_only=True)
    for name, case in CASES.items():
        precision = case.get("precision", {}).get("recipe", "fp32")
        with Allocations() as seen:
            parts = build_parts(_config(case), _host())
        ref = refs[precision]
        state = parts.model.state_dict()
        gathered = {key: full_tensor(value) for key, value in state.items()}  # collectives first, then checks
        loss = parts.model(TOKENS, labels=TOKENS)  # the model runs on the storage the layout allocated
        assert gathered.keys() == ref["state"].keys(), name
        for key, value in state.items():
            assert isinstance(value, DTensor), key
            assert torch.equal(gathered[key], ref["state"][key]), f"{name}: {key}"  # bit for bit
            if value.to_local().shape != value.shape:
                assert tuple(value.shape) not in seen.shapes, f"{name}: {key} {tuple(value.shape)} allocated whole"
        assert_rel_close(loss.detach().float(), ref["loss"].float(), 1e-5 if precision == "fp32" else 1e-2, name=name)

    _column_shards()

    # a parameter that declares no init, sharded by fsdp: the same one-line error on every rank
    with torch.device("meta"):
        model = TinyTransformer(TinyConfig())
        model.extra = nn.Linear(32, 8, bias=False)
    layout = FSDPLayout()
    from mcore.mesh import build_mesh

    model = layout.apply(model, build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu"))
    try:
        init_params(model, seed=SEED, device="cpu")
    except UserError as exc:
        message = str(exc)
    else:
        raise AssertionError("an undeclared sharded parameter was initialised")
    assert message.startswith("parameter 'extra.weight' is sharded") and "declare init" in message, message
    assert "\n" not in message
    dist.barrier()


def test_meta_init_is_layout_independent(tmp_path: Path) -> None:
    path = tmp_path / "reference.pt"
    torch.save({p: _reference(p) for p in ("fp32", "bf16")}, path)
    run_distributed(_cases, 4, str(path), timeout=240.0)
