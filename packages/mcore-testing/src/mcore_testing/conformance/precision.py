"""Conformance checks for ``PrecisionRecipe`` implementations (single process)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from mcore.params import ParamSpec
from mcore.precision.quantized import QuantizedWeight
from mcore.protocols import PrecisionRecipe
from mcore_testing.numerics import DEFAULT_TOLERANCE, assert_rel_close, seeded_randn
from mcore_testing.reference import TinyTransformer, tiny_batches


class PrecisionConformance:
    """Subclass and implement ``make_recipe()``.

    ``forward_tolerance``: relative error of the loss against fp32 (default by the
    recipe's ``param_dtype``: 1e-5 fp32, 1e-2 bf16); ``gather_tolerance``: error of a
    ``gather_payload`` -> ``unpack`` round trip (0 for formats that gather the raw shard).
    """

    forward_tolerance: float | None = None
    gather_tolerance: float = 0.0

    def make_recipe(self) -> Any:
        raise NotImplementedError("subclass must implement make_recipe()")

    def _tolerance(self, recipe: Any) -> float:
        if self.forward_tolerance is not None:
            return self.forward_tolerance
        return DEFAULT_TOLERANCE.get(recipe.param_dtype, 1e-2)

    def test_is_precision_recipe(self) -> None:
        assert isinstance(self.make_recipe(), PrecisionRecipe)

    def test_prepare_sets_param_dtype_and_loss_matches_fp32(self) -> None:
        recipe = self.make_recipe()
        ref_model = TinyTransformer(seed=0)
        model = recipe.prepare(copy.deepcopy(ref_model))
        for name, p in model.named_parameters():
            assert p.dtype in (recipe.param_dtype, recipe.master_dtype), f"{name} has dtype {p.dtype}"
        tokens, labels = tiny_batches(1, seed=3)[0]
        with recipe.autocast():
            loss = model(tokens, labels=labels)
        ref = ref_model(tokens, labels=labels)
        assert_rel_close(loss.float(), ref, self._tolerance(recipe), name="loss")

    def test_scaled_backward_unscales_to_true_gradients(self) -> None:
        recipe = self.make_recipe()
        model = recipe.prepare(TinyTransformer(seed=0))
        twin = copy.deepcopy(model)
        tokens, labels = tiny_batches(1, seed=4)[0]
        with recipe.autocast():
            loss = model(tokens, labels=labels)
        recipe.scale_loss(loss).backward()
        assert bool(recipe.unscale_grads(model)) is True  # a bool or a 0-d bool tensor
        with recipe.autocast():
            twin(tokens, labels=labels).backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert_rel_close(p.grad.float(), q.grad.float(), self._tolerance(recipe), name=f"grad of {name}")
        recipe.update()

    def test_non_finite_gradients_detected(self) -> None:
        recipe = self.make_recipe()
        model = recipe.prepare(TinyTransformer(seed=0))
        tokens, labels = tiny_batches(1, seed=5)[0]
        with recipe.autocast():
            loss = model(tokens, labels=labels)
        recipe.scale_loss(loss).backward()
        next(model.parameters()).grad.view(-1)[0] = float("nan")
        assert bool(recipe.unscale_grads(model)) is False
        recipe.update()

    def test_state_dict_round_trip(self) -> None:
        recipe = self.make_recipe()
        other = self.make_recipe()
        other.load_state_dict(copy.deepcopy(recipe.state_dict()))
        assert set(other.state_dict()) == set(recipe.state_dict())

    def test_gather_payload_round_trip(self) -> None:
        recipe = self.make_recipe()
        shard = seeded_randn(64, 32, seed=6).to(recipe.param_dtype)
        payload = recipe.gather_payload(shard, name="layers.0.mlp.up.weight", spec=ParamSpec("matrix"))
        if payload is None:
            return  # gathers the shard as is: nothing to pack
        full = recipe.unpack(payload.tensors, payload.metadata)
        if isinstance(full, QuantizedWeight):  # handed to the recipe's GEMM modules as is
            assert callable(getattr(recipe, "dequantize", None)), "unpack returns QuantizedWeight: dequantize needed"
            full = recipe.dequantize(full)[: shard.shape[0]]
        assert full.shape == shard.shape
        assert_rel_close(full.float(), shard.float(), max(self.gather_tolerance, 1e-12), name="unpacked shard")

    def test_grouped_linear_matches_reference(self) -> None:
        """A recipe that takes MoE's grouped GEMM (``grouped_linear``) equals the plain reference
        (including an expert with no rows); one that declines returns ``NotImplemented``."""
        recipe = self.make_recipe()
        if not callable(getattr(recipe, "grouped_linear", None)):
            return  # the reference runs for this recipe: nothing of its own to check
        from mcore.precision.grouped import grouped_linear_reference

        x = seeded_randn(24, 32, seed=7).to(recipe.param_dtype).requires_grad_()
        weight = seeded_randn(3, 16, 32, seed=8).to(recipe.param_dtype).requires_grad_()
        sizes = torch.tensor([10, 0, 14])
        with recipe.autocast():
            out = recipe.grouped_linear(x, weight, sizes)
        if out is NotImplemented:
            return
        ref_x, ref_w = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        ref = grouped_linear_reference(ref_x, ref_w, sizes)
        assert out.shape == ref.shape
        assert_rel_close(out.float(), ref, self._tolerance(recipe), name="grouped_linear")
        grad = seeded_randn(*ref.shape, seed=9)
        out.float().backward(grad)
        ref.backward(grad)
        assert x.grad is not None and weight.grad is not None
        assert_rel_close(x.grad.float(), ref_x.grad, self._tolerance(recipe), name="grad of x")  # type: ignore[arg-type]
        assert_rel_close(weight.grad.float(), ref_w.grad, self._tolerance(recipe), name="grad of weight")  # type: ignore[arg-type]

    def test_after_step_runs(self) -> None:
        recipe = self.make_recipe()
        model = recipe.prepare(TinyTransformer(seed=0))
        recipe.after_step(model)
