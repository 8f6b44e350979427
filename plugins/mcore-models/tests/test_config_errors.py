"""Model settings that cannot build a model are refused when the config is resolved.

``GPTConfig`` and every block ``Config`` check themselves; ``GPT.check_run`` refuses a
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
        (["--model.hidden_size=60", "--model.num_heads=8"], "model.num_heads = 8: must divide hidden_size = 60"),
        (["--model.num_kv_heads=3"], "model.num_kv_heads = 3: must divide num_heads = 4"),
        (["--model.num_kv_heads=8"], "model.num_kv_heads = 8: must divide num_heads = 4"),
        (["--model.num_kv_heads=0"], "model.num_kv_heads = 0: must be a finite number > 0"),
        (["--model.head_dim=0"], "model.head_dim = 0: must be"),
        (["--model.ffn_hidden_size=0"], "model.ffn_hidden_size = 0: must be"),
        (["--model.vocab_size=0"], "model.vocab_size = 0: must be"),
        (["--model.num_layers=-1"], "model.num_layers = -1: must be"),
        (["--model.max_position_embeddings=0"], "model.max_position_embeddings = 0: must be"),
        (["--model.norm_eps=0"], "model.norm_eps = 0.0: must be a finite number > 0"),
        (["--model.norm_eps=-1e-5"], "model.norm_eps = -1e-05: must be"),
        (["--model.norm_eps=nan"], "model.norm_eps = 'nan': expected a number, not NaN"),
        (["--model.init_std=inf"], "model.init_std = 'inf': expected a finite number"),
        (["--model.mtp_loss_weight=-1"], "model.mtp_loss_weight = -1.0: must be a finite number >= 0"),
        (["--model.clamp_limit=0"], "model.clamp_limit = 0.0: must be"),
        (["--model.gelu_approximate=fast"], "model.gelu_approximate = 'fast': allowed: none, tanh"),
        (["--model.sliding_window=0"], "model.sliding_window = 0: must be"),
        (["--model.loss_chunk_size=0"], "model.loss_chunk_size = 0: must be"),
        (["--model.rope_scaling=ntk"], "model.rope_scaling = 'ntk': allowed: none, linear, llama3, yarn"),
        (["--model.rope_theta=0"], "model.rope_theta = 0.0: must be"),
        (["--model.rotary_fraction=0.1"], "model.rotary_fraction = 0.1 gives 1 rotated dims of head_dim 16"),
        (["--model.rotary_fraction=1.5"], "model.rotary_fraction = 1.5: must be in (0, 1]"),
        (
            ["--model.rope_scaling=llama3", "--model.rope_high_freq_factor=1"],
            "model.rope_high_freq_factor = 1.0: must be finite and greater than rope_low_freq_factor = 1.0",
        ),
        (["--model.attention=mla", "--model.kv_lora_rank=0"], "model.kv_lora_rank = 0: must be"),
        (["--model.attention=mla", "--model.q_lora_rank=0"], "model.q_lora_rank = 0: must be"),
        (["--model.attention=mla", "--model.v_head_dim=0"], "model.v_head_dim = 0: must be"),
        (
            ["--model.attention=mla", "--model.qk_rope_head_dim=3"],
            "model.rotary_fraction = 1.0 gives 3 rotated dims of head_dim 3",
        ),
        (
            ["--train.seq_len=1025"],
            "train.seq_len = 1025 is more than model.max_position_embeddings = 1024; lower train.seq_len or raise",
        ),
    ],
)
def test_bad_model_settings_are_refused_at_resolve(host: Any, overrides: list[str], message: str) -> None:
    assert message in resolve_error(host, *overrides)


def test_settings_that_only_another_block_reads_are_not_checked(host: Any) -> None:
    # MLA rotates qk_rope_head_dim, so a rotary_fraction that suits it passes although head_dim 16 * 0.0625 = 1
    config = resolve_config(
        load_raw(
            None, [*BASE, "--model.attention=mla", "--model.qk_rope_head_dim=32", "--model.rotary_fraction=0.0625"]
        ),
        host,
    )
    assert config.model.config.rotary_fraction == 0.0625
    # the longest sequence the model supports is allowed
    assert resolve_config(load_raw(None, [*BASE, "--train.seq_len=1024"]), host).train.seq_len == 1024


def test_every_preset_resolves_with_the_default_sequence_length(host: Any) -> None:
    for preset in GPT.presets():
        resolve_config(load_raw(None, [*BASE, f"--model.preset={preset}"]), host)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: GPTConfig(norm_eps=0.0), "model.norm_eps"),
        (lambda: GPTConfig(norm_eps=math.nan), "model.norm_eps"),
        (lambda: GPTConfig(num_heads=8, num_kv_heads=3), "model.num_kv_heads"),
        (lambda: GPTConfig(rope_theta=math.inf), "model.rope_theta"),
        (lambda: Attention.Config(num_heads=4, num_kv_heads=3), "attention.num_kv_heads"),
        (lambda: Attention.Config(norm_eps=math.nan), "attention.norm_eps"),
        (lambda: Attention.Config(head_dim=6, rotary_fraction=0.5), "attention.rotary_fraction"),
        (lambda: MLA.Config(qk_rope_head_dim=5), "mla.rotary_fraction"),
        (lambda: MLA.Config(kv_lora_rank=0), "mla.kv_lora_rank"),
        (lambda: SwiGLU.Config(ffn_hidden_size=0), "mlp.ffn_hidden_size"),
        (lambda: SwiGLU.Config(init_std=math.nan), "mlp.init_std"),
        (lambda: ClampedSwiGLU.Config(clamp_limit=math.nan), "mlp.clamp_limit"),
        (lambda: GeluMLP.Config(gelu_approximate="fast"), "mlp.gelu_approximate"),
        (lambda: RMSNorm.Config(norm_eps=0.0), "norm.norm_eps"),
        (lambda: LayerNorm.Config(norm_eps=-1.0), "norm.norm_eps"),
        (lambda: MTP.Config(norm_eps=math.inf), "mtp.norm_eps"),
    ],
)
def test_configs_check_themselves(build: Any, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} = "):
        build()


@pytest.fixture
def cli_host(host: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.num_kv_heads=3"], "model.num_kv_heads = 3"),
        (["--model.hidden_size=60", "--model.num_heads=8"], "model.num_heads = 8"),
        (["--model.norm_eps=0"], "model.norm_eps = 0.0"),
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
