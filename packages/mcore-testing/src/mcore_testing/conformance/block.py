"""Conformance checks for ``ModelBlock`` implementations."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from typing import Any

import pytest
import torch

from mcore.protocols import AuxLosses, BlockContext, FlopsShape, ModelBlock
from mcore_testing.conformance.params import ParamSpecConformance
from mcore_testing.numerics import assert_finite, assert_rel_close, seeded_generator, seeded_randn


class BlockConformance(ParamSpecConformance):
    """Subclass and implement ``make_block(hidden_size)``.

    Class attributes: ``hidden_size``; ``causal`` (a token's output depends only on earlier
    tokens); ``supports_packed`` (honours ``ctx.cu_seqlens``: no mixing across documents);
    ``dtypes`` to check. Every block must leave the context it gets unchanged (it is frozen; its
    tensors and ``extra`` must not change in place either): the model may call it again with the
    same view. The contexts given carry an ``AuxLosses`` collector, for blocks that add to it.
    """

    hidden_size: int = 32
    causal: bool = True
    supports_packed: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    def make_block(self, hidden_size: int) -> Any:
        raise NotImplementedError("subclass must implement make_block(hidden_size)")

    def _ctx(self, B: int, T: int, cu: list[int] | None = None) -> BlockContext:
        if cu is None:
            positions = torch.arange(T).expand(B, T)
            return BlockContext(positions=positions, aux_losses=AuxLosses())
        pos = torch.cat([torch.arange(b - a) for a, b in pairwise(cu)]).view(B, T)
        lengths = [b - a for a, b in pairwise(cu)]
        return BlockContext(
            positions=pos,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            max_seqlen=max(lengths),
            aux_losses=AuxLosses(),
        )

    def test_is_model_block(self) -> None:
        assert isinstance(self.make_block(self.hidden_size), ModelBlock)

    def test_shape_and_dtype_preserved(self) -> None:
        for dtype in self.dtypes:
            block = self.make_block(self.hidden_size).to(dtype)
            x = seeded_randn(2, 8, self.hidden_size, seed=1, dtype=dtype)
            y = block(x, self._ctx(2, 8))
            assert y.shape == x.shape and y.dtype == dtype
            assert_finite(y, "block output")

    def test_backward_gives_finite_grads(self) -> None:
        block = self.make_block(self.hidden_size)
        x = seeded_randn(2, 8, self.hidden_size, seed=2).requires_grad_()
        block(x, self._ctx(2, 8)).square().mean().backward()
        assert x.grad is not None
        assert_finite(x.grad, "input grad")
        for name, p in block.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, f"parameter {name} got no gradient"
                assert_finite(p.grad, f"grad of {name}")

    def test_leaves_the_context_unchanged(self) -> None:
        """The block may be re-run with the same view (recompute): it must not change it, in place or not."""
        block = self.make_block(self.hidden_size)
        B, T = (1, 16) if self.supports_packed else (2, 8)
        ctx = self._ctx(B, T, [0, 5, 12, 16] if self.supports_packed else None)
        fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
        tensors = {name: (v.clone(), v._version) for name, v in fields.items() if isinstance(v, torch.Tensor)}
        extra = dict(ctx.extra)
        x = seeded_randn(B, T, self.hidden_size, seed=8).requires_grad_()
        block(x, ctx).square().mean().backward()
        for name, value in fields.items():
            assert getattr(ctx, name) is value, f"the block replaced ctx.{name}"
        for name, (copy, version) in tensors.items():
            now = getattr(ctx, name)
            assert now._version == version and torch.equal(now, copy), f"the block changed ctx.{name} in place"
        assert dict(ctx.extra).keys() == extra.keys(), "the block changed ctx.extra"
        assert all(ctx.extra[k] is v for k, v in extra.items()), "the block changed ctx.extra"

    def test_num_parameters_counts_every_parameter(self) -> None:
        block = self.make_block(self.hidden_size)
        assert block.num_parameters() == sum(p.numel() for p in block.parameters())

    def test_flops_positive_and_grow_with_tokens(self) -> None:
        block = self.make_block(self.hidden_size)
        small = block.flops(FlopsShape(tokens=8, attended=36))
        large = block.flops(FlopsShape(tokens=16, attended=136))
        assert isinstance(small, int) and small >= 0 and large >= small

    def test_reset_parameters_reproducible(self) -> None:
        a, b = self.make_block(self.hidden_size), self.make_block(self.hidden_size)
        a.reset_parameters(seeded_generator(7))
        b.reset_parameters(seeded_generator(7))
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), f"parameter {name} differs after reset with the same seed"

    def test_causal(self) -> None:
        if not self.causal:
            pytest.skip("block declares causal = False")
        block = self.make_block(self.hidden_size)
        x = seeded_randn(1, 8, self.hidden_size, seed=3)
        x2 = x.clone()
        x2[:, 5:] = seeded_randn(1, 3, self.hidden_size, seed=4)
        y, y2 = block(x, self._ctx(1, 8)), block(x2, self._ctx(1, 8))
        assert_rel_close(y2[:, :5], y[:, :5], name="outputs before the changed tokens")

    def test_packed_documents_do_not_mix(self) -> None:
        if not self.supports_packed:
            pytest.skip("block declares supports_packed = False")
        block = self.make_block(self.hidden_size)
        cu = [0, 5, 12, 16]  # three documents in one row of 16 tokens
        x = seeded_randn(1, 16, self.hidden_size, seed=5)
        x2 = x.clone()
        x2[:, 5:12] = seeded_randn(1, 7, self.hidden_size, seed=6)  # change only document 2
        y, y2 = block(x, self._ctx(1, 16, cu)), block(x2, self._ctx(1, 16, cu))
        assert_rel_close(y2[:, :5], y[:, :5], name="document 1 output")
        assert_rel_close(y2[:, 12:], y[:, 12:], name="document 3 output")
