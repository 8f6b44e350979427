"""Device mesh from [parallel] sizes: size resolution, errors, and real gloo meshes."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from mcore.mesh import build_mesh, order_dims, resolve_sizes
from mcore_testing import distributed


def test_order_is_canonical_with_custom_dims_before_tp():
    assert order_dims(["tp", "dp_shard", "pp", "mine"]) == ["pp", "dp_shard", "mine", "tp"]


def test_fill_dimension_takes_the_rest():
    assert resolve_sizes(["dp_shard", "tp"], {"tp": 2}, 8, fill="dp_shard") == {"dp_shard": 4, "tp": 2}


def test_sizes_that_do_not_divide_world_are_an_error():
    with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the world size 8"):
        resolve_sizes(["dp_shard", "tp"], {"tp": 3}, 8, fill="dp_shard")


def test_sizes_that_do_not_multiply_to_world_are_an_error():
    with pytest.raises(ValueError, match=r"multiply to 4 but the world size is 8"):
        resolve_sizes(["dp_shard", "tp"], {"tp": 2, "dp_shard": 2}, 8, fill=None)


def test_single_on_many_processes_suggests_a_dp_layout():
    with pytest.raises(ValueError, match=r"add a data-parallel layout"):
        resolve_sizes([], {}, 2, fill=None)


def test_size_for_dimension_no_layout_owns():
    with pytest.raises(ValueError, match=r"parallel.sizes names dimension 'cp', which no chosen layout owns"):
        resolve_sizes(["dp_shard"], {"cp": 2}, 2, fill="dp_shard")


def test_world_size_one_needs_no_process_group():
    mesh = build_mesh(["dp_shard"], {}, fill="dp_shard", device_type="cpu")
    assert mesh.device_mesh is None and not dist.is_initialized()
    assert (mesh.world_size, mesh.size("dp_shard"), mesh.rank("dp_shard"), mesh.group("dp_shard")) == (1, 1, 0, None)


@distributed(world_size=4)
def test_two_dimensional_gloo_mesh():
    mesh = build_mesh(["dp_replicate", "dp_shard"], {"dp_replicate": 2}, fill="dp_shard", device_type="cpu")
    assert mesh.dim_names == ("dp_replicate", "dp_shard") and mesh.dim_sizes == (2, 2)
    rank = dist.get_rank()
    assert (mesh.rank("dp_replicate"), mesh.rank("dp_shard")) == divmod(rank, 2)
    assert dist.get_world_size(mesh.group("dp_shard")) == 2
    assert mesh.submesh(["dp_replicate", "dp_shard"]).ndim == 2
