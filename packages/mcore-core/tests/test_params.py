"""Declared parameter roles and fused layouts (``mcore.params``), and the conformance checks on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcore.params import (
    ROLES,
    Init,
    ParamSpec,
    apply_role_overrides,
    check_param_specs,
    collect_param_specs,
    logical_blocks,
    matrix_shape,
)
from mcore_testing import distributed
from mcore_testing.conformance.params import ParamSpecConformance, assert_param_specs_valid
from mcore_testing.reference import TinyConfig, TinyTransformer


class Fused(nn.Module):
    """A fused ``[q | k | v]`` projection that declares itself."""

    def __init__(self, q: int = 8, kv: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, q + 2 * kv, bias=True)
        self.q, self.kv = q, kv

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "qkv.weight": ParamSpec("matrix", splits=(("q", self.q), ("k", self.kv), ("v", self.kv)), head_rows=2),
            "not_there.weight": ParamSpec("head"),  # ignored by the lenient collector
        }


class Model(nn.Module):
    def __init__(self, *, tied: bool = False, declare_head: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.block = Fused()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.declare_head = declare_head

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"head.weight": ParamSpec("head")} if self.declare_head else {}


def roles(specs: dict[str, ParamSpec]) -> dict[str, str]:
    return {name: spec.role for name, spec in specs.items()}


def test_roles_are_declared_or_structural() -> None:
    specs = collect_param_specs(Model())
    assert list(specs) == [name for name, _ in Model().named_parameters()]
    assert roles(specs) == {
        "embed.weight": "embedding",
        "block.qkv.weight": "matrix",
        "block.qkv.bias": "bias",
        "norm.weight": "norm",
        "norm.bias": "bias",
        "head.weight": "head",  # declared: no name pattern is needed
    }
    assert specs["block.qkv.weight"].splits == (("q", 8), ("k", 4), ("v", 4))
    assert roles(collect_param_specs(Model(declare_head=False)))["head.weight"] == "matrix"  # structure alone
    assert set(ROLES) == {"embedding", "head", "matrix", "norm", "bias", "expert", "router"}


def test_tied_weights_have_one_name_and_outer_declarations_win() -> None:
    tied = collect_param_specs(Model(tied=True))
    assert "head.weight" not in tied and tied["embed.weight"].role == "embedding"

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Fused()

        def param_specs(self) -> dict[str, ParamSpec]:
            return {"inner.qkv.weight": ParamSpec("router")}

    assert collect_param_specs(Outer())["inner.qkv.weight"] == ParamSpec("router")


def test_user_overrides_first_match_wins_and_keep_splits() -> None:
    specs = collect_param_specs(Model())
    out = apply_role_overrides(specs, {r"qkv\.weight$": "expert", r"qkv": "router", r"^head\.": "matrix"})
    assert out["block.qkv.weight"] == ParamSpec("expert", splits=specs["block.qkv.weight"].splits, head_rows=2)
    assert out["block.qkv.bias"].role == "router"
    assert out["head.weight"].role == "matrix"
    assert specs["head.weight"].role == "head"  # the input is not changed
    with pytest.raises(ValueError, match=r"^role_overrides: '\(head' is not a valid regular expression") as exc:
        apply_role_overrides(specs, {"(head": "head"})
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"^role_overrides: 'head' = 'heads' is not a role; allowed: embedding, head"):
        apply_role_overrides(specs, {"head": "heads"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "output"}, r"role = 'output' is not a parameter role; allowed: embedding, head, matrix"),
        ({"role": "matrix", "splits": (("q", 0),)}, r"split 'q' has 0 rows; allowed: a positive int"),
        ({"role": "matrix", "splits": (("q", 4), ("q", 4))}, r"split names must be distinct"),
        ({"role": "matrix", "splits": (("q", 4), ("k", 3)), "head_rows": 2}, r"head_rows = 2 does not divide .*'k'"),
        ({"role": "matrix", "head_rows": 0}, r"head_rows = 0; allowed: a positive int or None"),
        (
            {"role": "matrix", "tp": "colwise"},
            r"tp = 'colwise'; allowed: column, row, vocab, replicate, partial or None",
        ),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParamSpec(**kwargs)


def test_strict_check_names_the_bad_declaration() -> None:
    with pytest.raises(ValueError, match=r"Fused.param_specs\(\) \(at 'block'\) declares 'not_there.weight'"):
        check_param_specs(Model())

    class WrongRows(Fused):
        def param_specs(self) -> dict[str, ParamSpec]:
            return {"qkv.weight": ParamSpec("matrix", splits=(("q", 8), ("k", 4), ("v", 5)))}

    with pytest.raises(ValueError, match=r"'qkv.weight': splits .* sum to 17 rows, but the parameter has 16"):
        check_param_specs(WrongRows())


def test_tp_style_is_declared_or_by_role_and_fits_the_shape() -> None:
    from mcore.params import check_spec_shape, tp_style

    assert tp_style(ParamSpec("matrix", tp="row")) == "row"
    assert tp_style(ParamSpec("embedding")) == tp_style(ParamSpec("head")) == "vocab"
    assert tp_style(ParamSpec("norm")) == tp_style(ParamSpec("bias")) == "replicate"
    assert tp_style(ParamSpec("matrix")) is None and tp_style(ParamSpec("expert")) is None  # never guessed
    check_spec_shape("b", ParamSpec("bias", tp="column"), (8,))  # a column-parallel bias splits its rows
    with pytest.raises(ValueError, match=r"'b': tp = 'row' splits dim 1 of a matrix, but its shape is \[8\]"):
        check_spec_shape("b", ParamSpec("bias", tp="row"), (8,))
    from mcore_testing.reference import TinyConfig, TinyTransformer

    specs = check_param_specs(TinyTransformer(TinyConfig(fused=False, num_kv_heads=2)))
    styles = {name.split("layers.0.")[-1]: tp_style(spec) for name, spec in specs.items() if "layers.1" not in name}
    assert styles["attn.q.weight"] == styles["mlp.up.weight"] == "column"
    assert styles["attn.proj.weight"] == styles["mlp.down.weight"] == "row"
    assert styles["embed.weight"] == "vocab" and styles["attn_norm.weight"] == "replicate"


def test_blocks_of_a_fused_matrix() -> None:
    spec = ParamSpec("matrix", splits=(("q", 8), ("k", 4), ("v", 4)), head_rows=4)
    assert logical_blocks(spec, 16) == [("q", 0, 8), ("k", 8, 4), ("v", 12, 4)]
    assert logical_blocks(spec, 16, by_head=True) == [("q.0", 0, 4), ("q.1", 4, 4), ("k.0", 8, 4), ("v.0", 12, 4)]
    assert logical_blocks(ParamSpec("matrix", head_rows=3), 6, by_head=True) == [("0", 0, 3), ("1", 3, 3)]
    assert matrix_shape((4, 16, 8), "expert") == (4, 16, 8)  # one matrix per expert
    assert matrix_shape((4, 16, 8), "matrix") == (1, 4, 128)
    assert matrix_shape((16,), "bias") == (1, 16, 1)


@distributed(world_size=2, timeout=120)
def test_declarations_survive_torch_fully_shard() -> None:
    """``fully_shard`` swaps each module's class for a subclass and its parameters for row-sharded
    DTensors: names, declarations and (global) shapes stay, so the declarations stay valid."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = TinyTransformer(TinyConfig(num_layers=1))
    before = check_param_specs(model)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    assert check_param_specs(model) == before


class BadDeclaration(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, 2 * hidden_size)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"up.weight": ParamSpec("matrix", splits=(("gate", 3), ("up", 3)))}


class BadDeclarationSuite(ParamSpecConformance):
    def make_module(self) -> nn.Module:
        return BadDeclaration(8)


class TestReferenceDeclarations(ParamSpecConformance):
    def make_module(self) -> nn.Module:
        return TinyTransformer()


def test_conformance_catches_a_bad_declaration() -> None:
    with pytest.raises(ValueError, match=r"'up.weight': splits .* sum to 6 rows, but the parameter has 16"):
        BadDeclarationSuite().test_param_specs_are_valid()


def test_reference_model_declares_its_fused_layouts() -> None:
    model = TinyTransformer()
    assert_param_specs_valid(model)
    specs = collect_param_specs(model)
    assert specs["lm_head.weight"].role == "head" and specs["pos.weight"].role == "embedding"
    assert specs["layers.0.attn.qkv.weight"] == ParamSpec(
        "matrix", splits=(("q", 32), ("k", 32), ("v", 32)), head_rows=8, init=Init("normal", std=0.02)
    )
    assert specs["layers.0.mlp.gate_up.weight"].splits == (("gate", 64), ("up", 64))
    # the declared rows are the ones the forward uses
    x = torch.randn(1, 3, 32)
    q, _, v = model.layers[0].attn.qkv(x).split(32, dim=-1)
    w = model.layers[0].attn.qkv.weight
    assert torch.allclose(q, x @ w[:32].T) and torch.allclose(v, x @ w[64:].T)
