"""``fsdp`` on one process starts no process group: ``apply`` leaves ``torch.distributed`` as it found it.

Each case runs in a fresh interpreter (the test process itself never has a default group to
lose). Before, ``apply`` called ``init_process_group`` on a private store and never destroyed
it: ``is_initialized()`` turned true and the caller's own ``init_process_group`` then failed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = """
import copy, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from helpers import UNEVEN, reference_trace, train
from mcore.mesh import build_mesh
from mcore.ragged import annotate_for_checkpoint, full_tensor
from mcore_fsdp.layout import FSDPLayout, HSDPLayout
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer

ckpt = sys.argv[1]
assert not dist.is_initialized()
for cls in (FSDPLayout, HSDPLayout):
    # hsdp halves the gradients (through the pooled reduce buffers); fsdp's are views of the shard
    layout = cls(cls.Config(gradient_divide_factor=2.0 if cls is HSDPLayout else 1.0))
    mesh = build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu")
    model = layout.apply(TinyTransformer(copy.deepcopy(UNEVEN), seed=0), mesh)
    assert not dist.is_initialized(), f"{cls.name}: apply started the default process group"
    assert all(isinstance(p, DTensor) for p in model.parameters())
    trace = train(model, steps=2)
    assert not dist.is_initialized()
    ref = reference_trace(steps=2)
    for name, g in trace.grads[0].items():  # hsdp: divided by 2
        assert_rel_close(g * layout.config.gradient_divide_factor, ref.grads[0][name], 1e-6, name=f"{cls.name} {name}")

# the state dict: sharded DTensors, whole through mcore.ragged, saved and loaded with DCP
layout = FSDPLayout(FSDPLayout.Config(whole_params="matrices"))
model = layout.apply(TinyTransformer(copy.deepcopy(UNEVEN), seed=0), build_mesh(layout.mesh_dims, device_type="cpu"))
train(model, steps=1)
state = model.state_dict()
assert all(isinstance(t, DTensor) for t in state.values())
saved = {k: full_tensor(t) for k, t in state.items()}
annotate_for_checkpoint(state)
dcp.save(state, checkpoint_id=ckpt)
fresh = FSDPLayout().apply(TinyTransformer(copy.deepcopy(UNEVEN), seed=1), build_mesh(("dp_shard",), device_type="cpu"))
target = fresh.state_dict()
annotate_for_checkpoint(target)
dcp.load(target, checkpoint_id=ckpt)
fresh.load_state_dict(target)
for k, t in fresh.state_dict().items():
    torch.testing.assert_close(full_tensor(t), saved[k], rtol=0, atol=0, msg=k)
assert not dist.is_initialized()

# the caller can still start its own group, and the sharded model keeps working beside it
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
train(fresh, steps=1)
dist.destroy_process_group()
print("ok")
"""


def test_apply_starts_no_process_group(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "ckpt")],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
