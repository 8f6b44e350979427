"""The FSDP2 drop-in test: one script, PyTorch's FSDP2 or mcore-fsdp by its import, same losses."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close

sys.path.insert(0, str(Path(__file__).parent))


@distributed(2, timeout=240)
def test_fsdp2_script_runs_with_mcore_import(tmp_path: Path) -> None:
    import fsdp2_script

    path = tmp_path / "ckpt"
    theirs = fsdp2_script.main("torch", str(path / "torch"))
    ours = fsdp2_script.main("mcore", str(path / "mcore"))
    dist.barrier()
    assert len(ours) == 4
    assert_rel_close(torch.tensor(ours), torch.tensor(theirs), 1e-5, name="losses mcore vs torch FSDP2")
