"""Conformance checks for parameter declarations (``mcore.params``) and optimizer state sizes.

Optimizers, precision recipes and layouts trust what a model declares about its parameters
(role, fused splits, head rows), and ``mcore plan`` trusts what an optimizer says about its
state. Both are promises; these checks hold implementations to them:

* ``ParamSpecConformance``: subclass and implement ``make_module()`` (a block or a whole
  model); its declarations must name its own parameters, use known roles, and split rows that
  add up to each parameter's rows. ``BlockConformance`` includes it (it builds the module with
  ``make_block``).
* ``check_state_size(factory, model, optimizer)``: for an optimizer factory that implements
  ``OptimizerStateSize``, what ``state_bytes`` reports for every parameter must equal the bytes
  of the tensors in the optimizer's ``state_dict()`` after a step (``OptimizerConformance``
  calls it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mcore.params import ROLES, check_param_specs, collect_param_specs, matrix_shape
from mcore.protocols.optimizer import OptimizerStateSize


def assert_param_specs_valid(module: nn.Module) -> None:
    """Every declaration of ``module`` (and of the modules under it) is valid; see ``ParamSpecConformance``."""
    specs = check_param_specs(module)  # ValueError naming the first bad declaration
    names = [name for name, _ in module.named_parameters()]
    assert list(specs) == names, "collect_param_specs must give every parameter, in named_parameters order"
    params = dict(module.named_parameters())
    for name, spec in specs.items():
        assert spec.role in ROLES, f"{name!r}: unknown role {spec.role!r}"
        if spec.splits:
            _, rows, _ = matrix_shape(params[name].shape, spec.role)
            assert sum(r for _, r in spec.splits) == rows, f"{name!r}: splits do not add up to {rows} rows"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_state_size(factory: Any, model: nn.Module, optimizer: Any, *, rel_tol: float = 0.0) -> None:
    """``factory.state_bytes`` summed over ``model``'s trainable parameters equals the tensor bytes of
    ``optimizer.state_dict()["state"]`` (single process, after at least one step); and
    ``shards_state_over_dp`` answers a bool. Nothing is checked for a factory without them."""
    if not isinstance(factory, OptimizerStateSize):
        return
    specs = collect_param_specs(model)
    reported = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            size = factory.state_bytes(tuple(p.shape), specs[name], param_dtype=p.dtype)
            assert isinstance(size, int) and size >= 0, f"state_bytes for {name!r} gave {size!r}; expected an int >= 0"
            reported += size
    state = optimizer.state_dict()
    measured = _tensor_bytes(state["state"] if isinstance(state, Mapping) and "state" in state else state)
    assert abs(reported - measured) <= rel_tol * measured, (
        f"state_bytes reports {reported} bytes of optimizer state, the optimizer holds {measured}"
    )
    for sharded in (False, True):
        assert isinstance(factory.shards_state_over_dp(sharded_params=sharded), bool)


class ParamSpecConformance:
    """Subclass and implement ``make_module()`` returning the block or model whose declarations to check."""

    def make_module(self) -> nn.Module:
        make_block = getattr(self, "make_block", None)
        if make_block is None:
            raise NotImplementedError("subclass must implement make_module()")
        return make_block(getattr(self, "hidden_size", 32))

    def test_param_specs_are_valid(self) -> None:
        assert_param_specs_valid(self.make_module())
