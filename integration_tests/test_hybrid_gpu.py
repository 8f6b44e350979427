"""A hybrid ``gpt`` model on CUDA with mcore-ssm's Triton scans (the default there since 2026-12-06) against the same
model on the torch reference scans (``MCORE_SSM_KERNELS=torch``): loss and every parameter's gradient, fp32, with
``gdn``, ``mamba2`` and attention layers at the kernels' chunk size (64) over rows longer than two chunks.

The kernel tests of mcore-ssm check each scan alone; this checks the blocks around them (conv, gates, norms, the
grouped heads) hand the kernels what the reference gets, through a whole model's forward and backward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore_models.gpt import GPT, GPTConfig
from mcore_ssm.gdn_kernels import pick as pick_gdn
from mcore_ssm.mamba2_kernels import pick as pick_mamba2
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import rel_error

pytestmark = pytest.mark.gpu

VOCAB = 128
VALUES: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_layers": 4,
    "layers": ["mamba2/none", "gdn/swiglu", "attention/swiglu", "mamba2/swiglu"],
    "mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 64},
    "gdn": {"num_qk_heads": 2, "num_v_heads": 4, "head_k_dim": 16, "head_v_dim": 16, "chunk_size": 64},
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "swiglu": {"ffn_hidden_size": 128},
}


def loss_and_grads(kernels: str, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setenv("MCORE_SSM_KERNELS", kernels)
    device = torch.device("cuda")
    expected = "torch" if kernels == "torch" else "triton"
    assert pick_gdn("auto", device, 64) == expected and pick_mamba2("auto", device, 64) == expected
    host = isolated_host("mcore_models.plugin", "mcore_ssm.plugin")
    lookup = lambda block: host.load("block", block)  # noqa: E731
    model = GPT.build(GPTConfig.from_values(VALUES), seed=7, device="cuda", block_lookup=lookup)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 150), generator=gen).cuda()  # 150 = two chunks of 64 and a partial one
    labels = torch.randint(0, VOCAB, (2, 150), generator=gen).cuda()
    loss = model(tokens, labels=labels)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_hybrid_model_on_the_triton_scans_equals_the_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 GEMMs on both sides
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    loss, grads = loss_and_grads("triton", monkeypatch)
    ref_loss, ref_grads = loss_and_grads("torch", monkeypatch)
    assert torch.isfinite(loss) and rel_error(loss, ref_loss) < 1e-5, (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    worst = max((rel_error(grads[n], ref_grads[n]), n) for n in grads)
    assert worst[0] < 1e-5, worst
