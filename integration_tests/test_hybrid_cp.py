"""A hybrid ``gpt`` (``gdn``, ``mamba2`` and ``attention`` mixers) under ``cp`` equals one process.

The recurrent blocks run under context parallelism by a head-parallel all-to-all (``mcore.sequence_split``,
which the ``cp`` layout puts in the context): each rank projects its own tokens, the all-to-all gives it every
token of the full rows for ``heads / cp`` of the heads, the conv and the recurrence run there with the full
rows' documents, and the inverse all-to-all brings back its tokens for the gated norm and the output
projection; attention keeps the layout's ``kind``. Each case trains 2 SGD steps from the batch ``shard_batch``
makes and checks the loss (summed over the ranks) and every gradient against one process (fp32, rel 1e-5).

CI runs one spawned group of 2 gloo ranks: ``ring`` on rows of one document, ``a2a`` on packed documents (no
conv window and no state crosses a document), ``allgather`` with dynamic CP on packed documents (the recurrent
layers see the micro-batch as one flat row cut at the row ends), ``mamba2`` with fewer groups than ranks (each
group's ``B``/``C`` repeated to the ranks whose heads read it) and with activation recompute (the all-to-alls
run again in backward); refusals in one line: heads that do not split over ``cp`` and a third-party recurrent
block that does not read the split. ``slow``: cp4 (``ring``, ``a2a+ring``, packed) and ``["tp", "cp"]`` on 4 ranks.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.errors import UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols import BlockContext
from mcore.train.recompute import apply_recompute
from mcore_models.gpt import GPT, GPTConfig
from mcore_parallel.cp import CPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

VOCAB, SEQ, ROWS, STEPS = 128, 16, 2, 2
#: every head count divides by 2 and 4 ranks (and by 2 x 2 under tp x cp); ``mamba2``: 8 heads in 4 groups
MODEL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_layers": 3,
    "max_position_embeddings": 64,
    "layers": ["gdn/swiglu", "mamba2/none", "attention/swiglu"],
    "gdn": {"num_qk_heads": 4, "num_v_heads": 8, "head_k_dim": 8, "head_v_dim": 4, "chunk_size": 4},
    "mamba2": {"d_state": 8, "headdim": 8, "ngroups": 4, "chunk_size": 4},
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "swiglu": {"ffn_hidden_size": 48},
}
#: documents of 5, 11, 11 and 5 tokens over two rows of 16; the second step's 23-token one crosses the row end
PACKED = ([0, 5, 16, 27, 32], [0, 3, 4, 27, 32])


def _host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_ssm.plugin", "mcore_parallel.plugin", "mcore_testing.plugin")


def _reference(**overrides: Any) -> GPT:
    host = _host()
    torch.manual_seed(0)
    config = GPTConfig.from_values({**MODEL, **overrides})
    return GPT(config, block_lookup=lambda name: host.load("block", name))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _mesh(key: str) -> ParallelMesh:
    if key == "tp2 x cp2":
        return build_mesh(("cp", "tp"), {"tp": 2}, fill="cp", device_type="cpu")
    return build_mesh(("cp",), {}, fill="cp", device_type="cpu")


def _check(key: str, kind: str, *, packed: bool, dynamic: bool = False, recompute: bool = False, **model: Any) -> None:
    """``STEPS`` SGD steps under ``key``'s layouts equal one process: the loss and every gradient, each step."""
    name = (
        f"{key} {kind}{' dynamic' if dynamic else ''}{' packed' if packed else ''}{' recompute' if recompute else ''}"
    )
    name += "".join(f" {k}={v}" for k, v in model.items())
    mesh = _mesh(key)
    reference = _reference(**model)
    net: nn.Module = copy.deepcopy(reference)
    if recompute:
        apply_recompute(net, "full")
    layouts: list[Any] = [TPLayout()] if "tp" in key else []
    layout = CPLayout(CPLayout.Config(kind=kind, a2a_size=2 if kind == "a2a+ring" else None, dynamic=dynamic))
    layouts.append(layout)
    for each in layouts:
        net = each.apply(net, mesh)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, net)]
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels[0, : 3 + step] = -100

        def ctx(step: int = step) -> BlockContext:
            return BlockContext(cu_seqlens=torch.tensor(PACKED[step], dtype=torch.int32)) if packed else BlockContext()

        for opt in opts:
            opt.zero_grad()
        ref_loss = reference(tokens, labels=labels, ctx=ctx())
        ref_loss.backward()
        local_tokens, local_labels, view = tokens, labels, ctx()
        for each in layouts:
            if hasattr(each, "shard_batch"):
                local_tokens, local_labels, view = each.shard_batch(local_tokens, local_labels, view)
        assert view.sequence_split is not None and local_tokens.numel() < tokens.numel(), name
        loss = net(local_tokens, labels=local_labels, ctx=view)
        loss.backward()
        for each in reversed(layouts):
            each.finish_grad_sync()
        total = loss.detach().clone()
        dist.all_reduce(total, group=layout.loss_group())  # the ranks' losses add up to the micro-batch's
        assert_rel_close(total, ref_loss.detach(), 1e-5, name=f"{name} step {step}: loss")
        ref = dict(reference.named_parameters())
        for pname, p in net.named_parameters():
            want = ref[pname.replace("._checkpoint_wrapped_module", "")].grad
            assert p.grad is not None and want is not None, f"{name}: {pname} has no gradient"
            assert_rel_close(_full(p.grad), want, 1e-5, name=f"{name} step {step}: grad of {pname}")
        for opt in opts:
            opt.step()


class _OtherRecurrent(nn.Module):
    """A third-party recurrent mixer that does not read ``BlockContext.sequence_split``."""

    carries_sequence_state = True

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return hidden


def _refusals() -> None:
    mesh = _mesh("cp2")
    with pytest.raises(UserError, match=r"^cp: '1' \(_OtherRecurrent\) runs a state along .*supports_sequence_split"):
        CPLayout().apply(nn.Sequential(nn.Identity(), _OtherRecurrent()), mesh)
    cases = {  # the model's overrides -> the one line
        "gdn": ({"gdn": {**MODEL["gdn"], "num_qk_heads": 1, "num_v_heads": 2}}, "gdn query/key heads: 1 heads"),
        "mamba2": ({"mamba2": {**MODEL["mamba2"], "num_heads": 3, "ngroups": 1}}, "mamba2 heads: 3 heads"),
    }
    for overrides, start in cases.values():
        layout = CPLayout()
        net = layout.apply(_reference(**overrides), mesh)
        tokens = torch.zeros(1, SEQ, dtype=torch.int64)
        local_tokens, local_labels, view = layout.shard_batch(tokens, tokens, BlockContext())
        with pytest.raises(UserError) as info:
            net(local_tokens, labels=local_labels, ctx=view)
        message = str(info.value)
        assert "\n" not in message and message.startswith(start), message
        assert "do not split over parallel.sizes.cp = 2 ranks" in message and "allowed: a cp dividing" in message


def _ci() -> None:
    _refusals()
    _check("cp2", "ring", packed=False)
    _check("cp2", "a2a", packed=True)
    _check("cp2", "allgather", packed=True, dynamic=True)
    _check("cp2", "ring", packed=True, recompute=True, mamba2={**MODEL["mamba2"], "ngroups": 1})


def test_hybrid_gpt_under_cp2_equals_one_process() -> None:
    run_distributed(_ci, 2, timeout=300)


def _cp4() -> None:
    for kind in ("ring", "a2a", "a2a+ring"):
        for packed in (False, True):
            _check("cp4", kind, packed=packed)
    _check("cp4", "ring", packed=True, mamba2={**MODEL["mamba2"], "ngroups": 2})  # 2 groups repeated to 4 ranks
    _check("cp4", "allgather", packed=True, dynamic=True)
    for packed in (False, True):
        _check("tp2 x cp2", "a2a", packed=packed)


@pytest.mark.slow
def test_hybrid_gpt_under_cp4_and_tp_x_cp_equals_one_process() -> None:
    run_distributed(_cp4, 4, timeout=900)
