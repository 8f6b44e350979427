"""``reference-adamw``'s state: it round-trips, and a resume whose parameter dtype changed is refused in one line
(torch's AdamW would otherwise fail at the first step with a dtype error deep in its kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcore_testing.reference_optim import NamedAdamW


def _stepped(dtype: torch.dtype) -> NamedAdamW:
    model = nn.Linear(4, 3).to(dtype)
    optimizer = NamedAdamW(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    model(torch.ones(2, 4, dtype=dtype)).sum().backward()
    optimizer.step()
    return optimizer


def test_state_round_trips() -> None:
    saved = _stepped(torch.float32).state_dict()
    fresh = NamedAdamW(nn.Linear(4, 3), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    fresh.load_state_dict(saved)
    for name, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][name][key], value), (name, key)


def test_a_changed_parameter_dtype_is_refused_in_one_line() -> None:
    saved = _stepped(torch.float32).state_dict()
    bf16 = NamedAdamW(nn.Linear(4, 3).to(torch.bfloat16), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    with pytest.raises(
        ValueError, match=r"^optimizer state 'exp_avg' of 'weight' is torch.float32, the parameter is torch.bfloat16"
    ) as info:
        bf16.load_state_dict(saved)
    assert "\n" not in str(info.value)
