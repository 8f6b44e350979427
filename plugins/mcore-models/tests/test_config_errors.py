"""Model settings that cannot build a model are refused when the config is resolved.

``GPTConfig`` and every block ``Config`` check themselves (block settings in their own tables,
``model.attention.num_heads``), ``GPT.check_blocks`` checks what needs the blocks; ``GPT.check_run`` refuses a
``train.seq_len`` above ``max_position_embeddings``. ``mcore config`` and ``mcore train`` report
each as one line on stderr with exit code 2, before any data is prepared.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import mcore.plugins
from mcore.cli import main as mcore_main
from mcore.config import load_raw, resolve_config
from mcore.errors import ConfigError
from mcore.train.cli import main as train_main
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.presets import PRESETS
from mcore_testing.hosts import isolated_host

# the optimizer comes from the harness: this package's tests run without mcore-optim
BASE = ["--model.name=gpt", "--model.preset=tiny", "--optimizer.name=reference-adamw"]


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_testing.plugin")


def resolve_error(host: Any, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(load_raw(None, [*BASE, *overrides]), host)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--model.hidden_size=60", "--model.attention.num_heads=8"],
            "model.attention.num_heads = 8: must divide hidden_size = 60, or set head_dim",
        ),
        (["--model.attention.num_kv_heads=3"], "model.attention.num_kv_heads = 3: must divide num_heads = 4"),
        (["--model.attention.num_kv_heads=8"], "model.attention.num_kv_heads = 8: must divide num_heads = 4"),
        (["--model.attention.num_kv_heads=0"], "model.attention.num_kv_heads = 0: must be a finite number > 0"),
        (["--model.attention.head_dim=0"], "model.attention.head_dim = 0: must be"),
        (["--model.swiglu.ffn_hidden_size=0"], "model.swiglu.ffn_hidden_size = 0: must be"),
        (["--model.vocab_size=0"], "model.vocab_size = 0: must be"),
        (["--model.num_layers=-1"], "model.num_layers = -1: must be"),
        (["--model.max_position_embeddings=0"], "model.max_position_embeddings = 0: must be"),
        (["--model.rmsnorm.norm_eps=0"], "model.rmsnorm.norm_eps = 0.0: must be a finite number > 0"),
        (["--model.rmsnorm.norm_eps=-1e-5"], "model.rmsnorm.norm_eps = -1e-05: must be"),
        (["--model.rmsnorm.norm_eps=nan"], "model.rmsnorm.norm_eps = 'nan': expected a number, not NaN"),
        (["--model.attention.norm_eps=0"], "model.attention.norm_eps = 0.0: must be"),
        (["--model.init_std=inf"], "model.init_std = 'inf': expected a finite number"),
        (["--model.mtp_loss_weight=-1"], "model.mtp_loss_weight = -1.0: must be a finite number >= 0"),
        (
            ["--model.mlp=clamped-swiglu", "--model.clamped-swiglu.clamp_limit=0"],
            "model.clamped-swiglu.clamp_limit = 0.0: must be",
        ),
        (
            ["--model.mlp=gelu-mlp", "--model.gelu-mlp.gelu_approximate=fast"],
            "model.gelu-mlp.gelu_approximate = 'fast': allowed: none, tanh",
        ),
        (["--model.attention.sliding_window=0"], "model.attention.sliding_window = 0: must be"),
        (["--model.loss_chunk_size=0"], "model.loss_chunk_size = 0: must be"),
        (
            ["--model.attention.rope_scaling=ntk"],
            "model.attention.rope_scaling = 'ntk': allowed: none, linear, llama3, yarn",
        ),
        (["--model.attention.rope_theta=0"], "model.attention.rope_theta = 0.0: must be"),
        (
            ["--model.attention.rotary_fraction=0.1"],
            "model.attention.rotary_fraction = 0.1 gives 1 rotated dims of head_dim 16",
        ),
        (["--model.attention.rotary_fraction=1.5"], "model.attention.rotary_fraction = 1.5: must be in (0, 1]"),
        (
            ["--model.attention.rope_scaling=llama3", "--model.attention.rope_high_freq_factor=1"],
            "model.attention.rope_high_freq_factor = 1.0: must be finite and greater than rope_low_freq_factor = 1.0",
        ),
        (["--model.mixer=mla", "--model.mla.kv_lora_rank=0"], "model.mla.kv_lora_rank = 0: must be"),
        (["--model.mixer=mla", "--model.mla.q_lora_rank=0"], "model.mla.q_lora_rank = 0: must be"),
        (["--model.mixer=mla", "--model.mla.v_head_dim=0"], "model.mla.v_head_dim = 0: must be"),
        (
            ["--model.mixer=mla", "--model.mla.qk_rope_head_dim=3"],
            "model.mla.rotary_fraction = 1.0 gives 3 rotated dims of head_dim 3",
        ),
        (
            ["--train.seq_len=1025"],
            "train.seq_len = 1025 is more than model.max_position_embeddings = 1024; lower train.seq_len or raise",
        ),
        # composition: the layer pattern, block tables and names
        (
            ["--model.layers=3*attention/swiglu"],
            "model.layers = ['3*attention/swiglu'] gives 3 layers but num_layers = 2",
        ),
        (
            ["--model.layers=attention/swiglu,0*mla"],
            "model.layers item '0*mla': expected '[N*]mixer[/mlp]' with N >= 1",
        ),
        (
            ["--model.layers=attention/swiglu,none"],
            "model.layers = ['attention/swiglu', 'none']: every layer needs a mixer",
        ),
        (["--model.mlp=geluu"], "unknown block 'geluu' (did you mean 'gelu-mlp'?); available block"),
        (["--model.attention.num_head=2"], "unknown key 'model.attention.num_head' (value '2'); block 'attention'"),
        (["--model.mla.kv_lora_rank=8"], "[model.mla] configures block 'mla', which this model does not use"),
        (["--model.num_heads=8"], "model.num_heads is no longer a [model] key (run config schema 2): it is attention"),
        (["--model.ffn_hidden_size=8"], "e.g. --model.swiglu.ffn_hidden_size=8"),
        (["--model.hf_model_type="], "model.hf_model_type = '': expected a Hugging Face family name"),
    ],
)
def test_bad_model_settings_are_refused_at_resolve(host: Any, overrides: list[str], message: str) -> None:
    assert message in resolve_error(host, *overrides)


def test_settings_that_only_another_block_reads_are_not_checked(host: Any) -> None:
    # MLA rotates qk_rope_head_dim, so a rotary_fraction that suits it passes although head_dim 16 * 0.0625 = 1
    config = resolve_config(
        load_raw(
            None,
            [*BASE, "--model.mixer=mla", "--model.mla.qk_rope_head_dim=32", "--model.mla.rotary_fraction=0.0625"],
        ),
        host,
    )
    assert config.model.config.blocks["mla"].rotary_fraction == 0.0625
    assert "attention" not in config.model.config.blocks  # the preset's table of the swapped-out mixer is dropped
    # the longest sequence the model supports is allowed
    assert resolve_config(load_raw(None, [*BASE, "--train.seq_len=1024"]), host).train.seq_len == 1024


def test_every_preset_resolves_with_the_default_sequence_length(host: Any) -> None:
    for preset in PRESETS:
        resolve_config(load_raw(None, [*BASE, f"--model.preset={preset}"]), host)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: GPTConfig(vocab_size=0), "vocab_size"),
        (lambda: GPTConfig(init_std=math.nan), "init_std"),
        (lambda: GPTConfig(num_layers=2, layers=["1*attention"]), "layers"),
        (lambda: Attention.Config(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: Attention.Config(norm_eps=math.nan), "norm_eps"),
        (lambda: Attention.Config(head_dim=6, rotary_fraction=0.5), "rotary_fraction"),
        (lambda: Attention.Config(rope_theta=math.inf), "rope_theta"),
        (lambda: MLA.Config(qk_rope_head_dim=5), "rotary_fraction"),
        (lambda: MLA.Config(kv_lora_rank=0), "kv_lora_rank"),
        (lambda: SwiGLU.Config(ffn_hidden_size=0), "ffn_hidden_size"),
        (lambda: ClampedSwiGLU.Config(clamp_limit=math.nan), "clamp_limit"),
        (lambda: GeluMLP.Config(gelu_approximate="fast"), "gelu_approximate"),
        (lambda: RMSNorm.Config(norm_eps=0.0), "norm_eps"),
        (lambda: LayerNorm.Config(norm_eps=-1.0), "norm_eps"),
        (lambda: MTP.Config(norm_eps=math.inf), "norm_eps"),
    ],
)
def test_configs_check_themselves(build: Any, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} = "):
        build()


def test_a_block_table_given_in_python_is_validated_at_build() -> None:
    with pytest.raises(ValueError, match=r"^model.attention.num_kv_heads = 3: must divide num_heads = 4$"):
        GPT(GPTConfig(hidden_size=32, num_layers=1, blocks={"attention": {"num_heads": 4, "num_kv_heads": 3}}))
    with pytest.raises(ValueError, match=r"unknown key 'model.swiglu.ffn' .*block 'swiglu'"):
        GPT(GPTConfig(hidden_size=32, num_layers=1, blocks={"swiglu": {"ffn": 3}}))


@pytest.fixture
def cli_host(host: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.attention.num_kv_heads=3"], "model.attention.num_kv_heads = 3"),
        (["--model.hidden_size=60", "--model.attention.num_heads=8"], "model.attention.num_heads = 8"),
        (["--model.rmsnorm.norm_eps=0"], "model.rmsnorm.norm_eps = 0.0"),
        (["--model.num_heads=8"], "model.num_heads is no longer a [model] key"),
        (["--train.seq_len=4096"], "train.seq_len = 4096"),
    ],
)
def test_commands_report_one_line_and_exit_2(
    cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    out_dir = tmp_path / "run"
    commands = [
        lambda: mcore_main(["config", *BASE, *overrides]),
        lambda: train_main([*BASE, f"--train.out_dir={out_dir}", *overrides]),
    ]
    for command in commands:
        rc = command()
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mcore: error: ") and expected in lines[0], err
    assert not out_dir.exists()  # refused before anything was written (or any data prepared)
