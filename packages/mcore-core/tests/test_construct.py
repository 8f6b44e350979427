"""Meta-device construction on one process: boxes of a tensor filled alone equal the whole fill,
``Init`` declarations are validated, ``init_params`` materialises and fills a meta model (names
canonical, ties kept, fallbacks and buffers), and ``build_parts`` builds on meta only when the
model factory and every layout say they can. The multi-rank cases (``fsdp`` on 2 and 4 gloo
ranks, column shards) are in ``plugins/mcore-fsdp/tests/test_meta_init.py``."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mcore import init_rng
from mcore.config import resolve_config
from mcore.construct import canonical_name, init_params
from mcore.errors import UserError
from mcore.init_rng import fill_box_, key_for, normal_, trunc_normal_, uniform_
from mcore.params import Init, ParamSpec
from mcore.plugins import hookimpl
from mcore.train.build import build_parts
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import LayoutsPlugin
from mcore_testing.reference import TinyConfig, TinyModelFactory, TinyTransformer

SEED = 7
KEY = 0x0123456789ABCDEF
FILLS = {
    "normal": functools.partial(normal_, key=KEY, mean=0.1, std=0.02),
    "uniform": functools.partial(uniform_, key=KEY, low=-0.5, high=0.25),
    "trunc_normal": functools.partial(trunc_normal_, key=KEY, std=0.02, a=-0.04, b=0.04),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


# -- the element-index path of init_rng ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(FILLS))
def test_boxes_filled_alone_equal_the_whole(kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row ranges, column shards (Shard(1), even and uneven), a block of a 2-D mesh, a middle dim
    of a 3-D tensor, one element, an empty box, the whole: bit for bit the whole fill's values."""
    monkeypatch.setattr(init_rng, "CHUNK", 16)  # runs both shorter and longer than a chunk
    fill = FILLS[kind]
    for shape, boxes in {
        (13, 10): [((0, 0), (13, 10)), ((4, 0), (5, 10)), ((0, 3), (13, 3)), ((0, 9), (13, 1)), ((5, 2), (3, 4))],
        (6, 5, 7): [((0, 2, 0), (6, 2, 7)), ((1, 0, 3), (4, 5, 4)), ((2, 3, 6), (1, 1, 1)), ((0, 0, 0), (0, 5, 7))],
        (3, 40): [((0, 20), (3, 20)), ((1, 0), (2, 17))],  # runs of 20 and 17 elements, chunk 16
    }.items():
        whole = fill(torch.empty(shape, dtype=dtype), start=0)
        for offsets, local in boxes:
            out = fill_box_(torch.empty(local, dtype=dtype), fill, shape, offsets)
            want = whole[tuple(slice(o, o + n) for o, n in zip(offsets, local))]
            assert torch.equal(_bits(out), _bits(want)), (shape, offsets, local)
    # the column shards of a (7, 10) matrix over 4 ranks (3, 3, 3, 1 columns) put back together
    whole = fill(torch.empty(7, 10, dtype=dtype), start=0)
    cols = [
        fill_box_(torch.empty(7, n, dtype=dtype), fill, (7, 10), (0, c)) for c, n in ((0, 3), (3, 3), (6, 3), (9, 1))
    ]
    assert torch.equal(_bits(torch.cat(cols, dim=1)), _bits(whole))


def test_index_fill_matches_and_refuses_bad_indices() -> None:
    whole = normal_(torch.empty(50), KEY)
    index = torch.tensor([49, 0, 7, 8, 7, 31], dtype=torch.int64)
    assert torch.equal(normal_(torch.empty(6), KEY, index=index), whole[index])
    with pytest.raises(ValueError, match="give one of them"):
        normal_(torch.empty(6), KEY, start=1, index=index)
    with pytest.raises(ValueError, match="int64 with out.numel"):
        normal_(torch.empty(6), KEY, index=index.int())
    with pytest.raises(ValueError, match=r"\[0, 2\*\*62\)"):
        normal_(torch.empty(1), KEY, index=torch.tensor([-1]))
    with pytest.raises(ValueError, match="do not lie in"):
        fill_box_(torch.empty(2, 3), FILLS["normal"], (4, 4), (0, 2))
    with pytest.raises(ValueError, match="need 2 dims"):
        fill_box_(torch.empty(2), FILLS["normal"], (4, 4), (0,))


# -- declarations -------------------------------------------------------------------------------
def test_init_declarations_are_validated() -> None:
    assert ParamSpec("matrix").init is None  # every existing declaration stays valid
    assert Init("uniform").bounds == (0.0, 1.0) and Init("trunc_normal", std=1.0).bounds == (-2.0, 2.0)
    bad = {
        "kind = 'gauss'; allowed: normal": {"kind": "gauss"},
        "std = None; allowed: a finite number > 0": {"kind": "normal"},
        "std = -0.1": {"kind": "trunc_normal", "std": -0.1},
        "std = nan": {"kind": "normal", "std": math.nan},
        "Init('zeros') does not take std = 0.1; allowed: no fields": {"kind": "zeros", "std": 0.1},
        "Init('uniform') does not take value": {"kind": "uniform", "value": 1.0},
        "a = 1.0, b = 1.0; allowed: a < b": {"kind": "uniform", "a": 1.0, "b": 1.0},
        "value = None": {"kind": "constant"},
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            Init(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="init = 'normal'; allowed: an mcore.params.Init"):
        ParamSpec("matrix", init="normal")  # type: ignore[arg-type]


# -- init_params on one process -----------------------------------------------------------------
def _meta_tiny(cfg: TinyConfig | None = None) -> TinyTransformer:
    with torch.device("meta"):
        return TinyTransformer(cfg or TinyConfig(num_layers=2))


def _expected(model: nn.Module, name: str, seed: int = SEED) -> torch.Tensor:
    """What ``name``'s declared init gives the whole parameter (TinyTransformer's declarations)."""
    p = dict(model.named_parameters())[name]
    if p.dim() == 1:
        return torch.ones(p.shape, dtype=p.dtype)
    out = name.endswith(("proj.weight", "down.weight"))
    std = 0.02 / math.sqrt(2 * model.config.num_layers) if out else 0.02
    return normal_(torch.empty(p.shape, dtype=p.dtype), key_for(seed, canonical_name(name)), std=std)


def test_meta_model_gets_its_declared_values() -> None:
    model = _meta_tiny()
    before = {name: id(p) for name, p in model.named_parameters()}
    done = init_params(model, seed=SEED, device="cpu")
    assert len(done.declared) == len(before) and not done.reset_modules
    for name, p in model.named_parameters():
        assert id(p) == before[name] and isinstance(p, nn.Parameter) and p.requires_grad  # the same objects
        assert p.device.type == "cpu" and torch.equal(p, _expected(model, name)), name
    bf16 = _meta_tiny().to(torch.bfloat16)
    init_params(bf16, seed=SEED, device="cpu")
    w = bf16.layers[1].mlp.down.weight
    assert torch.equal(w, _expected(model, "layers.1.mlp.down.weight").to(torch.bfloat16))  # fp32 rounded once


def test_wrappers_and_ties_do_not_change_values() -> None:
    plain = _meta_tiny()
    init_params(plain, seed=SEED, device="cpu")
    wrapped = _meta_tiny()
    wrapped.layers[0] = checkpoint_wrapper(wrapped.layers[0])
    names = [n for n, _ in wrapped.named_parameters()]
    assert "layers.0._checkpoint_wrapped_module.attn.qkv.weight" in names
    init_params(wrapped, seed=SEED, device="cpu")
    for (name, p), (_, q) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(p, q), name
    tied = _meta_tiny()
    tied.lm_head.weight = tied.embed.weight  # one parameter, named embed.weight
    init_params(tied, seed=SEED, device="cpu")
    assert tied.lm_head.weight is tied.embed.weight and torch.equal(tied.embed.weight, plain.embed.weight)


def test_views_of_one_meta_buffer_stay_views_of_one_storage() -> None:
    """A module that lays two weights out in one buffer (the MoE experts' ``[gate | up]``: ``buffer[:, 0]`` and
    ``buffer[:, 1]``) keeps that layout through materialisation, with the values the separate weights get."""
    plain = _meta_tiny()
    init_params(plain, seed=SEED, device="cpu")
    packed = _meta_tiny()
    with torch.device("meta"):
        buffer = torch.empty(64, 2, 32)  # (R, 2, C): embed row r, then lm_head row r
    packed.embed.weight.data, packed.lm_head.weight.data = buffer[:, 0], buffer[:, 1]
    ids = {name: id(p) for name, p in packed.named_parameters()}
    init_params(packed, seed=SEED, device="cpu")
    embed, head = packed.embed.weight, packed.lm_head.weight
    assert {name: id(p) for name, p in packed.named_parameters()} == ids  # the same objects
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert embed.untyped_storage().nbytes() == 2 * embed.numel() * embed.element_size()  # one buffer, no more
    assert embed.stride() == head.stride() == (64, 1) and head.storage_offset() == embed.storage_offset() + 32
    for (name, p), (_, q) in zip(packed.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name
    assert all(
        p.is_contiguous() for name, p in packed.named_parameters() if "embed" not in name and "lm_head" not in name
    )


class Legacy(nn.Module):
    """Declares init for ``scale`` only; ``proj`` (weight and bias) is set by ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4))
        self.proj = nn.Linear(4, 3)
        self.calls = 0

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"scale": ParamSpec("norm", init=Init("constant", value=0.5))}

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.calls += 1
        with torch.no_grad():
            self.scale.fill_(-1.0)  # overwritten by the declared init
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=generator))


class Rotary(nn.Module):
    def __init__(self, with_hook: bool) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.empty(4), persistent=False)
        if with_hook:
            self.reset_buffers = self._reset  # type: ignore[method-assign]

    def _reset(self) -> None:
        self.inv_freq.copy_(1.0 / 10000 ** (torch.arange(4, dtype=torch.float32) / 4))


def test_undeclared_whole_parameters_use_reset_parameters_and_buffers_are_recomputed() -> None:
    def make(with_hook: bool = True) -> nn.Module:
        with torch.device("meta"):
            return nn.ModuleDict({"legacy": Legacy(), "rope": Rotary(with_hook)})

    a, b, c = make(), make(), make()
    done = init_params(a, seed=SEED, device="cpu")
    init_params(b, seed=SEED, device="cpu")
    init_params(c, seed=SEED + 1, device="cpu")
    assert done.reset_modules == ["legacy"] and done.declared == ["legacy.scale"] and done.buffer_modules == ["rope"]
    assert a.legacy.calls == 1 and torch.equal(a.legacy.scale, torch.full((4,), 0.5))  # the declaration wins
    assert torch.equal(a.legacy.proj.weight, b.legacy.proj.weight)  # the seed decides
    assert not torch.equal(a.legacy.proj.weight, c.legacy.proj.weight)
    assert torch.equal(a.rope.inv_freq, 1.0 / 10000 ** (torch.arange(4, dtype=torch.float32) / 4))
    with pytest.raises(
        UserError, match=r"buffer 'rope.inv_freq' is on the meta device and Rotary has no reset_buffers"
    ):
        init_params(make(with_hook=False), seed=SEED, device="cpu")
    with torch.device("meta"):
        bare = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(UserError, match=r"parameter '0.weight' declares no init and no module above it") as info:
        init_params(bare, seed=SEED, device="cpu")
    assert "\n" not in str(info.value) and "param_specs()" in str(info.value)
    with pytest.raises(UserError, match=r"train.seed = -1"):
        init_params(make(), seed=-1, device="cpu")


# -- build_parts: meta only when the factory and every layout say so ----------------------------
class MetaTiny(TinyModelFactory):
    """``reference-tiny`` that may be built on the meta device (its modules declare every init)."""

    supports_meta_init = True
    devices: list[str] = []

    @staticmethod
    def build(config: TinyConfig, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> nn.Module:
        MetaTiny.devices.append(str(device))
        with torch.device(device):
            return TinyTransformer(config, seed=seed)


class MetaTinyPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("model", "meta-tiny", MetaTiny)


def test_build_parts_builds_on_meta_when_factory_and_layouts_allow() -> None:
    host = isolated_host("mcore_testing.plugin", MetaTinyPlugin(), LayoutsPlugin())
    raw = {
        "model": {"name": "meta-tiny", "vocab_size": 61, "hidden_size": 36, "ffn_size": 50},
        "optimizer": {"name": "reference-adamw"},
        "train": {"seed": SEED, "recompute": "full"},
        "parallel": {"device": "cpu"},
    }
    MetaTiny.devices.clear()
    parts = build_parts(resolve_config(raw, host), host)
    assert MetaTiny.devices == ["meta"]
    for name, p in parts.model.named_parameters():
        assert torch.equal(p, _expected(parts.model, name)), name
    tokens = torch.randint(0, 61, (2, 8))
    parts.model(tokens, labels=tokens).backward()  # usable: recompute wrapped it on meta
    parts.optimizer.step()
    # a layout that does not declare supports_meta_init: today's path (the factory initialises)
    parts = build_parts(resolve_config({**raw, "parallel": {"device": "cpu", "layouts": ["test-ddp"]}}, host), host)
    assert MetaTiny.devices == ["meta", "cpu"]
    reference = TinyTransformer(parts.model.config, seed=SEED)
    assert all(torch.equal(p, q) for p, q in zip(parts.model.parameters(), reference.parameters()))


def test_a_model_larger_than_the_device_is_refused_before_allocating() -> None:
    """Meta parameters (views of one storage counted once) that need more bytes than the device has: a one-line
    UserError naming the size, nothing allocated; a model that fits is unaffected."""

    class Table(nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(rows, 256))

        def reset_parameters(self, generator: torch.Generator | None = None) -> None:
            nn.init.normal_(self.weight, generator=generator)

    with torch.device("meta"):
        huge = Table(10**11)  # 10^14 bytes in fp32
        small = Table(8)
    with pytest.raises(UserError, match=r"need 95,367\.4 GiB on each rank \(cpu\)") as err:
        init_params(huge, seed=0, device="cpu")
    assert "\n" not in str(err.value) and huge.weight.is_meta
    init_params(small, seed=0, device="cpu")
    assert not small.weight.is_meta
