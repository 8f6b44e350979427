"""``gpt`` built on the meta device and initialised after ``fsdp`` shards it: the same weights as one process.

``gpt`` declares every parameter's ``init`` (``supports_meta_init``), so ``build_parts`` builds it
on meta, the layout shards it, and each rank fills only its own rows with the values the whole
tensor holds there (``mcore.construct``). One spawned group of 4 gloo ranks runs ``fsdp`` over
4 ranks and ``hsdp`` 2 x 2 (rows over 2 ranks): gathered state dicts equal the one-process build
bit for bit, for a layer pattern mixing attention, MLA and a mixer-only layer, with MTP and sizes
that divide neither 2 nor 4.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mcore.config import resolve_config
from mcore.ragged import full_tensor
from mcore.train.build import build_parts, builds_on_meta
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

MODEL: dict[str, Any] = {
    "name": "gpt",
    "vocab_size": 61,
    "hidden_size": 36,
    "num_layers": 3,
    "layers": ["attention/swiglu", "mla/swiglu", "attention/none"],
    "mtp_num_layers": 1,
    "max_position_embeddings": 64,
    "loss_chunk_size": 7,
    "attention": {"num_heads": 2, "num_kv_heads": 1, "qkv_bias": True},
    "mla": {"num_heads": 2, "q_lora_rank": 12, "kv_lora_rank": 10, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4},
    "swiglu": {"ffn_hidden_size": 50},
}
RAW: dict[str, Any] = {
    "model": MODEL,
    "optimizer": {"name": "reference-adamw"},
    "train": {"seed": 5, "seq_len": 12},
    "parallel": {"device": "cpu"},
}
CASES: dict[str, dict[str, Any]] = {
    "fsdp4": {"layouts": ["fsdp"]},
    "fsdp2 (hsdp 2x2)": {"layouts": ["hsdp"], "sizes": {"dp_replicate": 2, "dp_shard": 2}},
}
TOKENS = torch.arange(2 * 12).reshape(2, 12) * 7 % 61


def _host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_fsdp.plugin", "mcore_testing.plugin")


def _config(parallel: dict[str, Any] | None = None) -> Any:
    raw = copy.deepcopy(RAW)
    raw["parallel"].update(parallel or {})
    return resolve_config(raw, _host())


def _cases(ref_path: str) -> None:
    ref = torch.load(ref_path, weights_only=True)
    for name, parallel in CASES.items():
        parts = build_parts(_config(parallel), _host())
        state = parts.model.state_dict()
        gathered = {key: full_tensor(value) for key, value in state.items()}
        loss = parts.model(TOKENS, labels=TOKENS)
        assert gathered.keys() == ref["state"].keys(), name
        for key, value in gathered.items():
            assert torch.equal(value, ref["state"][key]), f"{name}: {key}"  # bit for bit
        assert_rel_close(loss.detach(), ref["loss"], 1e-5, name=name)


def test_gpt_weights_are_the_same_for_one_process_fsdp2_and_fsdp4(tmp_path: Path) -> None:
    config = _config()
    factory = config.model.implementation.load()
    assert builds_on_meta(factory, [sel.instantiate() for sel in config.layouts])
    parts = build_parts(config, _host())
    state = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    assert any(k.startswith("mtp.0.") for k in state) and "layers.1.attention.kv_up.weight" in state
    ref_path = tmp_path / "ref.pt"
    torch.save({"state": state, "loss": parts.model(TOKENS, labels=TOKENS).detach()}, ref_path)
    run_distributed(_cases, 4, str(ref_path), timeout=240.0)
