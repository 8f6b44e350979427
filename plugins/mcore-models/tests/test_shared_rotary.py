"""The layers of a GPT share one ``Rotary`` (``share_rotaries``), which computes the RoPE tables once per call
that brings its positions (``ctx.positions``: every inference engine call; without them each layer makes its own
``0..T-1``, as before).

Why: a decode step recomputed ``cos``/``sin`` of the same positions in every layer (five small kernels a layer,
about a tenth of a small model's CUDA-graph decode step). Logits and gradients are unchanged; a positions tensor
changed in place, or another one, gets fresh tables.
"""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcore.protocols import BlockContext
from mcore_models.blocks.rope import Rotary, share_rotaries
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config


class _CountCos(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.cos.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(**overrides: object) -> GPT:
    return GPT.build(preset_config("tiny", num_layers=3, **overrides), seed=0, device=torch.device("cpu"))


def _unshared(model: GPT) -> GPT:
    """A copy whose every attention block has a ``Rotary`` of its own (what models had before sharing)."""
    other = copy.deepcopy(model)
    for module in other.modules():
        if isinstance(getattr(module, "rotary", None), Rotary):
            module.rotary = copy.deepcopy(module.rotary)
    return other


def test_layers_share_one_rotary_and_compute_the_tables_once_per_call() -> None:
    model = _model()
    rotaries = {id(m.rotary) for m in model.modules() if isinstance(getattr(m, "rotary", None), Rotary)}
    assert len(rotaries) == 1
    tokens = torch.randint(0, 64, (2, 11))
    ctx = BlockContext(positions=torch.arange(3, 14).expand(2, 11))
    with _CountCos() as counter:
        model(tokens, ctx=ctx)
    assert counter.count == 1
    unshared = _unshared(model)
    with _CountCos() as counter:
        unshared(tokens, ctx=ctx)
    assert counter.count == 3
    torch.testing.assert_close(model(tokens, ctx=ctx), unshared(tokens, ctx=ctx), rtol=0, atol=0)


def test_the_memo_follows_the_positions_tensor_and_its_changes() -> None:
    rotary = next(m.rotary for m in _model().modules() if isinstance(getattr(m, "rotary", None), Rotary))
    positions = torch.arange(6)[None]
    cos, sin = rotary(positions)
    again = rotary(positions)
    assert again[0] is cos and again[1] is sin  # the same object, unchanged: the kept tables
    positions.add_(5)  # changed in place: recomputed
    moved, _ = rotary(positions)
    assert moved is not cos and not torch.equal(moved, cos)
    torch.testing.assert_close(moved, rotary(torch.arange(5, 11)[None])[0], rtol=0, atol=0)  # another tensor
    with torch.inference_mode():  # inference tensors have no version counter: computed every time
        frozen = torch.arange(6)[None]
        first = rotary(frozen)[0]
        assert rotary(frozen)[0] is not first


def test_training_gradients_equal_the_unshared_model() -> None:
    model = _model()
    unshared = _unshared(model)
    tokens = torch.randint(0, 64, (2, 9))
    for m in (model, unshared):
        m(tokens, ctx=BlockContext(positions=torch.arange(9).expand(2, 9))).float().square().mean().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), unshared.named_parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_different_rope_settings_keep_their_own_tables() -> None:
    model = _model()
    blocks = [m for m in model.modules() if isinstance(getattr(m, "rotary", None), Rotary)]
    other = copy.deepcopy(blocks[1].rotary)
    other._inv_freq = other._inv_freq * 2  # another theta
    blocks[1].rotary = other
    assert share_rotaries(model) == 0  # blocks 0 and 2 share already; block 1's differs
    assert blocks[1].rotary is other and blocks[0].rotary is blocks[2].rotary
    blocks[2].rotary = copy.deepcopy(blocks[0].rotary)
    assert share_rotaries(model) == 1 and blocks[2].rotary is blocks[0].rotary
