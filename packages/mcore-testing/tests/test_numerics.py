"""Numerics helpers: the relative-error standard and NaN handling."""

from __future__ import annotations

import pytest
import torch

from mcore_testing import distributed
from mcore_testing.numerics import assert_finite, assert_rel_close, rel_error, seeded_randn, seeded_tokens


def test_rel_error_definition() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)


def test_default_tolerance_by_dtype() -> None:
    ref = seeded_randn(64, seed=0)
    assert_rel_close(ref * (1 + 1e-6), ref)
    with pytest.raises(AssertionError, match=r"relative error .* >= tolerance 1.0e-05"):
        assert_rel_close(ref * (1 + 1e-4), ref)
    assert_rel_close((ref * (1 + 5e-3)).bfloat16(), ref)  # bf16 default 1e-2


def test_nan_never_passes() -> None:
    ref = seeded_randn(8, seed=1)
    out = ref.clone()
    out[3] = float("nan")
    with pytest.raises(AssertionError, match="1 non-finite values"):
        assert_rel_close(out, ref, tol=1e9)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_finite(torch.tensor([float("inf")]))


def test_shape_mismatch() -> None:
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close(torch.zeros(2), torch.zeros(3))


def test_seeded_inputs_reproducible() -> None:
    assert torch.equal(seeded_randn(4, 4, seed=3), seeded_randn(4, 4, seed=3))
    assert not torch.equal(seeded_randn(4, 4, seed=3), seeded_randn(4, 4, seed=4))
    tokens = seeded_tokens((2, 5), vocab_size=7, seed=0)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 7


@distributed(2, timeout=120)
def test_ragged_dtensors_are_gathered_by_their_real_split() -> None:
    """A matrix held whole by rank 1 (rank 0 holds no rows) compares as the whole matrix."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (2,))
    whole = torch.arange(12, dtype=torch.float32).view(4, 3)
    local = whole if dist.get_rank() == 1 else whole[:0]
    ragged = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=whole.shape, stride=whole.stride())
    assert rel_error(ragged, whole) == 0.0
    assert_rel_close(ragged, whole, name="ragged")
