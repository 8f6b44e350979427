"""The ``gpt`` model: presets, registration, init from a seed, loss, packing, MTP, FLOPs and counts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mcore.plugins import hookimpl, load_plugins
from mcore.presets import Preset
from mcore.protocols.block import AuxLosses, BlockContext, BlockShared
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.loss_head import mtp_labels
from mcore_models.presets import PRESETS, preset_config
from mcore_testing.conformance import PresetConformance
from mcore_testing.numerics import assert_rel_close

REQUIRED_PRESETS = {
    "tiny",
    "bench-0.9b",
    "gpt-125m",
    "llama3.2-1b",
    "llama3-8b",
    "qwen2.5-0.5b",
    "deepseek-v3-mini-dense",
}


def tiny(**overrides: object) -> GPTConfig:
    return preset_config("tiny", **overrides)


def small_deepseek(**overrides: object) -> GPTConfig:
    values = {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 2,
        "swiglu": {"ffn_hidden_size": 96},
        "mla": {"q_lora_rank": 32, "kv_lora_rank": 24},
        "mtp_num_layers": 2,
    }
    return preset_config("deepseek-v3-mini-dense", **{**values, **overrides})


def test_registry_lists_blocks_and_model() -> None:
    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin"])
    assert {"rmsnorm", "layernorm", "attention", "mla", "swiglu", "gelu-mlp", "clamped-swiglu", "mtp"} <= set(
        host.registry.names("block")
    )
    gpt = host.load("model", "gpt")
    assert gpt is GPT and set(host.registry.names("preset")) >= REQUIRED_PRESETS
    families = {"llama", "qwen2", "mistral", "deepseek_v3", "qwen3_moe", "mixtral", "qwen3_next", "nemotron_h"}
    assert set(host.registry.names("hf")) == families
    for name in REQUIRED_PRESETS:  # every registered preset builds (its tables are its blocks' fields)
        preset = host.load("preset", name)
        assert isinstance(preset, Preset) and preset.model == "gpt" and preset is PRESETS[name]
        with torch.device("meta"):
            GPT(preset_config(name), block_lookup=lambda block: host.load("block", block))


def test_block_lookup_through_the_registry_builds_the_same_model() -> None:
    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin"])
    via_registry = GPT.build(tiny(), seed=3, device="cpu", block_lookup=lambda name: host.load("block", name))
    direct = GPT.build(tiny(), seed=3, device="cpu", block_lookup=None)
    for (name, a), b in zip(via_registry.state_dict().items(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_plugin_module_imports_no_torch() -> None:
    code = "import sys, mcore_models.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_gpt_imports_no_hugging_face_mapping() -> None:
    # the hf modules import gpt, never the other way round: no import cycle
    code = "import sys, mcore_models.gpt; print(sorted(m for m in sys.modules if m.startswith('mcore_models.hf')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_preset_has_889m_parameters_without_allocating() -> None:
    with torch.device("meta"):
        model = GPT(preset_config("bench-0.9b"))
    assert model.num_parameters() == 889_260_032


def test_gpt_125m_preset_has_gpt2_small_body() -> None:
    # GPT-2 small's 85M non-embedding parameters (12 x (4 x 768^2 + 3 x 768 x 2048 + norms)), 32k untied vocabulary
    with torch.device("meta"):
        model = GPT(preset_config("gpt-125m"))
    embedding = 2 * 32768 * 768
    assert model.num_parameters() == 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 768 + embedding == 135_285_504


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("llama3.2-1b", 1_235_814_400), ("llama3-8b", 8_030_261_248), ("qwen2.5-0.5b", 494_032_768)],
)
def test_public_presets_match_published_parameter_counts(preset: str, expected: int) -> None:
    with torch.device("meta"):
        model = GPT(preset_config(preset))
    assert model.num_parameters() == expected


def test_flops_per_token_formula() -> None:
    cfg = preset_config("bench-0.9b")
    seq = 4096
    head_dim, kv = 128, 8 * 128
    per_layer = 2048 * (2048 + 2 * kv) + 2048 * 2048 + 3 * 2048 * 5632
    matmul_params = 16 * per_layer + 2048 * 32768
    attention = 16 * 4 * 16 * head_dim * (seq + 1) // 2  # 4 * L * nh * hd * attended / T
    assert GPT.flops_per_token(cfg, seq) == 3 * (2 * matmul_params + attention)


def test_init_is_reproducible_from_the_seed() -> None:
    a, b, c = (GPT.build(small_deepseek(), seed=s, device="cpu") for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.numel() > 1 and pa.std() > 0:
            assert not torch.equal(pa, pc), name


def test_output_projections_have_scaled_init() -> None:
    cfg = tiny(num_layers=8, hidden_size=256, attention={"num_heads": 4}, swiglu={"ffn_hidden_size": 512})
    model = GPT.build(cfg, seed=0, device="cpu")
    layer = model.layers[0]
    for linear in (layer.attention.q, layer.attention.k, layer.attention.v, layer.mlp.gate, layer.mlp.up):
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert abs(layer.attention.out.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(layer.mlp.down.weight.std().item() - 0.02 / 4) < 0.0005


@pytest.mark.parametrize(("tie", "vocab_chunk"), [(False, None), (True, None), (False, 100)])
def test_loss_equals_unfused_reference(tie: bool, vocab_chunk: int | None) -> None:
    # chunks that divide neither the tokens nor the vocabulary
    cfg = tiny(tie_embeddings=tie, loss_chunk_size=7, loss_vocab_chunk_size=vocab_chunk)
    model = GPT.build(cfg, seed=0, device="cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, dims=1)
    labels[0, :3] = -100
    loss = model(tokens, labels=labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(tokens)
    ref = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_rel_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_rel_close(g, r)


def test_loss_adds_aux_losses_from_the_context() -> None:
    model = GPT.build(tiny(), seed=0, device="cpu")
    tokens = torch.randint(0, 512, (1, 8))
    aux = AuxLosses()
    aux.add(0, "z", torch.tensor(0.25))
    ctx = BlockContext(aux_losses=aux)
    assert_rel_close(model(tokens, labels=tokens, ctx=ctx), model(tokens, labels=tokens) + 0.25)


@pytest.mark.parametrize("make", [tiny, small_deepseek])
def test_packed_documents_are_isolated_in_the_model(make) -> None:  # type: ignore[no-untyped-def]
    cfg = make()
    model = GPT.build(cfg, seed=1, device="cpu")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
    cu = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)
    changed = tokens.clone()
    changed[0, 4:] = torch.randint(0, cfg.vocab_size, (6,), generator=gen)  # second document of row 0
    a = model(tokens, ctx=BlockContext(cu_seqlens=cu, max_seqlen=7))
    b = model(changed, ctx=BlockContext(cu_seqlens=cu, max_seqlen=7))
    assert_rel_close(b[0, :4], a[0, :4])
    assert_rel_close(b[1], a[1])
    # a document packed with others equals the same document alone
    alone = model(tokens[1:, 3:])
    assert_rel_close(a[1:, 3:], alone)


def test_mtp_labels_skip_document_ends() -> None:
    labels = torch.arange(8)[None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert mtp_labels(labels, positions, 1).tolist() == [[1, 2, -100, 4, 5, 6, 7, -100]]
    assert mtp_labels(labels, positions, 2).tolist() == [[2, -100, -100, 5, 6, 7, -100, -100]]


def test_mtp_loss_is_weighted_mean_over_depths() -> None:
    cfg = small_deepseek(mtp_loss_weight=0.5)
    model = GPT.build(cfg, seed=2, device="cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = tokens.roll(-1, 1)
    total = model(tokens, labels=labels)
    without = dataclasses.replace(cfg, mtp_num_layers=0)
    base = GPT.build(without, seed=2, device="cpu")
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp")})
    main = base(tokens, labels=labels)
    # the MTP part, computed by hand
    hidden = base.embed(tokens)
    for layer in base.layers:
        hidden = layer(hidden, BlockContext())
    positions = torch.arange(9).expand(2, 9)
    parts = []
    for depth, (module, norm) in enumerate(zip(model.mtp, model.mtp_norms, strict=True), start=1):
        ctx = BlockContext(extra={"mcore_models.mtp.next_embeddings": model.embed(tokens.roll(-depth, 1))})
        hidden = module(hidden, ctx)
        logits = F.linear(norm(hidden), model.output_weight)
        parts.append(F.cross_entropy(logits.flatten(0, 1), mtp_labels(labels, positions, depth).flatten()))
    assert_rel_close(total, main + 0.5 * (parts[0] + parts[1]) / 2)
    total.backward()
    assert all(p.grad is not None for p in model.mtp.parameters())


def test_mup_scales_logits_and_init() -> None:
    base = GPT.build(tiny(hidden_size=64), seed=0, device="cpu")
    wide = GPT.build(tiny(hidden_size=256, mup_base_width=64), seed=0, device="cpu")
    assert wide.logit_scale == 0.25
    for linear in (wide.layers[0].attention.q, wide.layers[0].attention.v, wide.layers[0].mlp.gate):
        assert abs(linear.weight.std().item() - 0.01) < 0.001
    assert wide.layers[0].attention.scale == 1 / 64
    tokens = torch.randint(0, 512, (1, 6))
    hidden_logits = F.linear(
        wide.final_norm(wide.layers[1](wide.layers[0](wide.embed(tokens), BlockContext()), BlockContext())),
        wide.output_weight,
    )
    assert_rel_close(wide(tokens), hidden_logits * 0.25)
    assert base.logit_scale == 1.0


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        GPT(tiny(hidden_size=60, attention={"num_heads": 8}))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny(vocab_size=0))


def test_logits_shape_and_bf16() -> None:
    model = GPT.build(tiny(), seed=0, device="cpu").to(torch.bfloat16)
    tokens = torch.randint(0, 512, (2, 5))
    assert model(tokens).shape == (2, 5, 512)
    loss = model(tokens, labels=tokens)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


class ToyMoE(torch.nn.Module):
    """Stands in for a block of another plugin: two experts, picked by token parity."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config:
        ffn_hidden_size: int = 8
        num_experts: int = 2

    def __init__(self, config: Config, *, hidden_size: int, shared: BlockShared) -> None:
        super().__init__()
        self.config, self.shared = config, shared
        self.experts = torch.nn.ModuleList(
            torch.nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(config.num_experts)
        )

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        ctx.add_aux_loss("toy_balance", hidden.float().pow(2).mean() * 0.0 + 0.5)
        return self.experts[0](hidden) + self.experts[1](hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, shape) -> int:  # type: ignore[no-untyped-def]
        return 2 * shape.tokens * sum(e.weight.numel() for e in self.experts)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for expert in self.experts:
            torch.nn.init.normal_(expert.weight, std=0.02, generator=generator)


class ToyPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry) -> None:  # type: ignore[no-untyped-def]
        registry.add("block", "toy-moe", ToyMoE, summary="test double for a MoE block")


def test_a_block_of_another_plugin_slots_in_by_name() -> None:
    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", ToyPlugin()])
    cfg = tiny(mlp="toy-moe", blocks={"toy-moe": {"ffn_hidden_size": 32}})
    model = GPT.build(cfg, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))
    assert all(isinstance(layer.mlp, ToyMoE) for layer in model.layers)
    assert model.layers[0].mlp.config.ffn_hidden_size == 32  # from its own table [model.toy-moe]
    # shared values come explicitly, never matched by field name
    assert [layer.mlp.shared.layer_index for layer in model.layers] == [0, 1]
    assert model.layers[1].mlp.shared == BlockShared(
        hidden_size=64, num_layers=2, init_std=0.02, output_init_std=0.01, layer_index=1
    )
    tokens = torch.randint(0, 512, (1, 6))
    with_aux = model(tokens, labels=tokens)
    ctx = BlockContext(aux_losses=AuxLosses())  # the caller's collector, to read after the call
    model(tokens, ctx=ctx)
    assert list(ctx.aux_losses or {}) == [(0, "toy_balance"), (1, "toy_balance")]
    assert torch.isfinite(with_aux)


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm": "layernorm", "mlp": "gelu-mlp", "layernorm": {"zero_centered_gamma": True}},
        {
            "mlp": "clamped-swiglu",
            "clamped-swiglu": {"clamp_limit": 1.0},
            "attention": {"qk_norm": True, "sliding_window": 4, "rotary_fraction": 0.5},
        },
        {"num_layers": 3, "layers": ["attention/gelu-mlp", "mla/none", "attention"]},
    ],
)
def test_other_block_choices_build_and_train(overrides: dict) -> None:  # type: ignore[type-arg]
    model = GPT.build(tiny(**overrides), seed=0, device="cpu")
    tokens = torch.randint(0, 512, (2, 9))
    loss = model(tokens, labels=tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_layer_pattern_picks_each_layers_blocks() -> None:
    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", ToyPlugin()])
    cfg = tiny(
        num_layers=4,
        layers=["1*mla/swiglu", "2*attention/toy-moe", "attention/none"],
        mla={"q_lora_rank": 16, "kv_lora_rank": 16},
        blocks={"toy-moe": {"num_experts": 2}},
    )
    assert cfg.layer_kinds() == [
        ("mla", "swiglu"),
        ("attention", "toy-moe"),
        ("attention", "toy-moe"),
        ("attention", "none"),
    ]
    assert cfg.block_names() == ["mla", "swiglu", "attention", "toy-moe", "rmsnorm"]
    model = GPT.build(cfg, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))
    kinds = [(type(layer.attention).__name__, type(layer.mlp).__name__) for layer in model.layers]
    assert kinds == [("MLA", "SwiGLU"), ("Attention", "ToyMoE"), ("Attention", "ToyMoE"), ("Attention", "NoneType")]
    assert model.layers[3].mlp_norm is None
    tokens = torch.randint(0, 512, (2, 7))
    loss = model(tokens, labels=tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    # FLOPs follow each layer's own blocks
    with torch.device("meta"):
        uniform = GPT(tiny(num_layers=4), block_lookup=lambda name: host.load("block", name))
    assert model.forward_flops(1, 16) != uniform.forward_flops(1, 16)


def test_per_layer_sliding_window_counts_attended_pairs() -> None:
    full, windowed = (tiny(attention={"sliding_window": w}) for w in (None, 4))
    seq = 16
    per_layer = 4 * 4 * 16  # 2 * 2 * heads * head_dim per attended pair
    difference = (seq * (seq + 1) // 2) - (4 * 5 // 2 + (seq - 4) * 4)
    assert GPT.flops_per_token(full, seq) - GPT.flops_per_token(windowed, seq) == 3 * 2 * per_layer * difference // seq


def test_mfu_flops_of_a_model_with_another_plugins_block() -> None:
    from types import SimpleNamespace

    from mcore.train.loop import model_flops_per_token

    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", ToyPlugin()])
    cfg = tiny(mlp="toy-moe")
    run = SimpleNamespace(model=SimpleNamespace(config=cfg), train=SimpleNamespace(seq_len=16))
    flops = model_flops_per_token(GPT, run, host)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = GPT(cfg, block_lookup=lambda name: host.load("block", name))
    assert flops == 3 * model.forward_flops(1, 16) // 16
    with pytest.raises(ValueError, match=r"block 'toy-moe' is not one of mcore-models'"):
        GPT.flops_per_token(cfg, 16)  # without the registry a plugin's block cannot be found


class TestPresetsOfThisPlugin(PresetConformance):
    plugins = ("mcore_models.plugin",)
    distribution = "mcore-models"
