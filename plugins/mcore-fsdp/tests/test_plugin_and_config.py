"""Single-process checks: registration, shard geometry, the buffer pool, user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mcore_fsdp.plugin
from mcore_fsdp.geometry import plan
from mcore_fsdp.layout import FSDPLayout, HSDPLayout, find_units
from mcore_fsdp.pool import BufferPool
from mcore_testing.reference import TinyConfig, TinyTransformer


def test_registers_layouts_without_importing_torch_code(plugin_host) -> None:
    code = "import sys, mcore_fsdp, mcore_fsdp.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    host = plugin_host(mcore_fsdp.plugin)
    assert host.get("layout", "fsdp").ref == "mcore_fsdp.layout:FSDPLayout"
    assert host.load("layout", "hsdp") is HSDPLayout
    assert FSDPLayout.mesh_dims == ("dp_shard",) and HSDPLayout.mesh_dims == ("dp_replicate", "dp_shard")


def test_geometry_matches_dtensor_chunks() -> None:
    # (5, 3) on 4 ranks: chunks of 2 rows -> 2, 2, 1, 0 rows, as torch.chunk / Shard(0)
    geo = plan([(5, 3), (7,), (2, 2)], 4)
    a, b, c = geo.slots
    assert [a.local_rows(r) for r in range(4)] == [len(x) for x in torch.arange(5).chunk(4)] + [0]
    assert (a.rows, a.chunk_numel, b.offset, b.rows, c.offset) == (2, 6, 6, 2, 8)
    assert geo.shard_numel == 6 + 2 + 2 and geo.full_numel == 40
    with pytest.raises(ValueError, match="0-dim"):
        plan([()], 2)


def test_pool_lends_the_smallest_buffer_that_fits_any_kind() -> None:
    pool = BufferPool(torch.device("cpu"))
    a, b = pool.acquire("param", torch.float32, 4), pool.acquire("rs_in", torch.float32, 10)
    assert (a.tensor.numel(), b.tensor.numel(), pool.allocations) == (4, 12, 2)  # whole buffers: 16, 48 bytes
    assert a.tensor.dtype == torch.float32 and a.raw.numel() == 16
    pool.release(b)
    pool.release(a)
    for _ in range(3):  # the same requests every step: nothing new is made
        x, y = pool.acquire("gather", torch.bfloat16, 14), pool.acquire("param", torch.float32, 3)
        assert (x.tensor.dtype, x.raw.numel(), y.raw.numel()) == (torch.bfloat16, 48, 16)  # bytes: 28 -> 40, 12 -> 16
        x.view(14).fill_(1.0)
        pool.release(x)
        pool.release(y)
    assert pool.allocations == 2 and pool.lent == 0
    big = pool.acquire("param", torch.float32, 13)  # nothing fits 52 bytes: one of the requested size
    assert big.raw.numel() == 64 and pool.allocations == 3


def test_config_errors_name_key_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"parallel.fsdp.param_dtype = 'fp8'; allowed: auto, fp32, bf16, fp16"):
        FSDPLayout(FSDPLayout.Config(param_dtype="fp8"))
    with pytest.raises(ValueError, match=r"parallel.fsdp.prefetch = -1; allowed"):
        FSDPLayout(FSDPLayout.Config(prefetch=-1))
    with pytest.raises(ValueError, match=r"parallel.fsdp.units names 'blocks'"):
        find_units(TinyTransformer(), ("blocks",))
    assert len(find_units(TinyTransformer(), ("layers",))) == 2
    # a pipeline stage holds its layers in a ModuleDict keyed by their index in the whole model
    model = TinyTransformer(TinyConfig(num_layers=3))
    stage = model.pipeline_stage(range(1, 3), first=False, last=True)
    assert find_units(stage, ("layers",)) == [model.layers[1], model.layers[2]]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--parallel.fsdp.prefetch=-1", "parallel.fsdp.prefetch = -1"),
        ("--parallel.fsdp.gradient_divide_factor=0", "parallel.fsdp.gradient_divide_factor = 0"),
    ],
)
def test_bad_layout_settings_are_one_line_errors_when_the_config_is_resolved(override: str, named: str) -> None:
    """Checked by the Config itself, so `mcore config` refuses them before anything is built (exit 2, one line)."""
    code = (
        "import sys; from mcore.cli import main; "
        "sys.exit(main(['config', '--model.name=reference-tiny', '--optimizer.name=reference-adamw', "
        f"'--parallel.layouts=[\"fsdp\"]', {override!r}]))"
    )
    env = {**os.environ, "MCORE_PLUGINS": "mcore_testing.plugin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
