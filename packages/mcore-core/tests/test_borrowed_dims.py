"""A layout may work over a mesh dimension another layout owns (``borrowed_dims``: fsdp sharding
over ``dp_shard`` x ``cp``, as torchtitan borrows); one that borrows what nobody owns is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch.distributed as dist
from test_train_loop import make_config, make_corpus

from mcore.errors import ConfigError
from mcore.mesh import build_mesh
from mcore.plugins import hookimpl
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import AllReduceLayout
from mcore_testing.split_layouts import SplitLayoutsPlugin


class BorrowsCp(AllReduceLayout):
    """``test-ddp`` that also names ``cp`` as a dimension it works over."""

    name: ClassVar[str] = "test-borrow"
    borrowed_dims: ClassVar[tuple[str, ...]] = ("cp",)


class BorrowPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("layout", "test-borrow", f"{__name__}:BorrowsCp", summary="tests: borrows cp")


def test_borrowing_a_dimension_nobody_owns_is_refused(tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", BorrowPlugin())
    cfg = make_config(host, tmp_path / "run", make_corpus(tmp_path), {"parallel": {"layouts": ["test-borrow"]}})
    with pytest.raises(ConfigError, match=r"layout 'test-borrow' works over mesh dimension 'cp', which no other"):
        run(cfg, host)


def _flattened() -> None:
    mesh = build_mesh(("dp_replicate", "cp"), {"dp_replicate": 1, "cp": 2}, fill="cp", device_type="cpu")
    both = mesh.submesh(["dp_replicate", "cp"])  # what a borrowing layout works over: one flattened group
    assert both is not None and both.size() == 2 and both.mesh_dim_names == ("dp_replicate", "cp")
    assert sorted(both.mesh.flatten().tolist()) == [0, 1] and dist.get_world_size() == 2


def test_a_borrowed_dimension_is_part_of_the_flattened_mesh() -> None:
    run_distributed(_flattened, 2, timeout=120)


def _owned(root: str, corpus: str) -> None:
    host = isolated_host("mcore_testing.plugin", BorrowPlugin(), SplitLayoutsPlugin())
    update = {"parallel": {"layouts": ["test-seq", "test-borrow"], "sizes": {"cp": 2}}, "data": {"packing": "concat"}}
    result = run(make_config(host, Path(root) / "run", corpus, update), host)
    assert result.steps_done == 6


def test_borrowing_an_owned_dimension_builds_and_runs(tmp_path: Path) -> None:
    run_distributed(_owned, 2, str(tmp_path), make_corpus(tmp_path), timeout=180)
