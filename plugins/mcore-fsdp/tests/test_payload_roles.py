"""A precision recipe is told each parameter's name in the model and its declared role when FSDP
asks how to gather it (``gather_payload(shard, name=, spec=)``), so it can keep the embedding and
the head in high precision; a recipe whose method takes neither is still asked the old way."""

from __future__ import annotations

import copy
from typing import Any

import torch
from helpers import RowInt8Recipe, quantize_rows

from mcore.mesh import build_mesh
from mcore.protocols import GatherPayload
from mcore_fsdp.layout import FSDPLayout
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer, tiny_batches


class RoleAwareInt8:
    """int8 gathers for declared matrices only; records what it was told."""

    param_dtype = torch.float32
    reduce_dtype = torch.float32

    def __init__(self) -> None:
        self.asked: dict[str, str | None] = {}

    def gather_payload(self, shard: torch.Tensor, *, name: str, spec: Any) -> GatherPayload | None:
        self.asked[name] = None if spec is None else spec.role
        if spec is None or spec.role != "matrix":
            return None  # embedding, head, norms: gathered as they are
        q, scale = quantize_rows(shard)
        return GatherPayload(tensors=(q, scale), metadata=shard.dtype)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> torch.Tensor:
        q, scale = gathered
        return (q.float() * scale).to(metadata)


def _check() -> None:
    mesh = build_mesh(("dp_shard",), {}, fill="dp_shard", device_type="cpu")
    reference = TinyTransformer(seed=0)
    recipe = RoleAwareInt8()
    layout = FSDPLayout(FSDPLayout.Config(quantized_gather=True))
    model = layout.apply(copy.deepcopy(reference), mesh, recipe)  # type: ignore[arg-type]
    names = dict(reference.named_parameters())
    assert set(recipe.asked) == set(names)  # full names in the model, not names inside a unit
    assert recipe.asked["embed.weight"] == "embedding" and recipe.asked["lm_head.weight"] == "head"
    assert recipe.asked["layers.0.attn.qkv.weight"] == "matrix"
    # reference: only the matrices go through the int8 round trip
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if recipe.asked[name] == "matrix":
                q, scale = quantize_rows(p)
                p.copy_(q.float() * scale)
    tokens, labels = tiny_batches(1, batch_size=2, seed=3)[0]
    rank, world = mesh.rank("dp_shard"), mesh.size("dp_shard")
    rows = slice(rank * 2 // world, (rank + 1) * 2 // world)
    loss = model(tokens[rows], labels=labels[rows])
    want = reference(tokens[rows], labels=labels[rows])
    assert_rel_close(loss.detach(), want.detach(), 1e-5, name="loss with role-aware int8 gathers")


def test_recipe_is_told_name_and_role_one_process() -> None:
    _check()
    assert not torch.distributed.is_initialized()


def test_recipe_is_told_name_and_role_two_ranks() -> None:
    run_distributed(_check, 2, timeout=120)


def test_recipe_without_name_and_spec_is_asked_the_old_way() -> None:
    from mcore_fsdp.storage import payload_kwargs

    assert payload_kwargs(RowInt8Recipe(), ("w", None)) == {}
    assert payload_kwargs(RoleAwareInt8(), ("w", None)) == {"name": "w", "spec": None}
