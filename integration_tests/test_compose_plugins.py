"""Models x layouts x optimizers composed by name: 2-rank FSDP training equals one process.

Everything is resolved the way a run config is (``resolve_config`` over every installed
plugin): model ``gpt`` (mcore-models), layout ``fsdp`` (mcore-fsdp), optimizers from
mcore-optim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mcore.config import load_raw, resolve_config
from mcore.mesh import build_mesh
from mcore.plugins import load_plugins
from mcore.ragged import full_tensor
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_tokens

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16


def _train(layouts: str, optimizer: str, out: str, *extra: str) -> None:
    """Train ``gpt`` tiny for STEPS steps; rank 0 saves losses and full parameters to ``out``."""
    torch.manual_seed(0)
    host = load_plugins(env=False, unpackaged=False, strict=True)
    overrides = [
        "--model.name=gpt", "--model.preset=tiny", f"--optimizer.name={optimizer}", "--optimizer.lr=0.01",
        f"--parallel.layouts={layouts}", *extra,
    ]  # fmt: skip
    config = resolve_config(load_raw(None, overrides), host)
    built = [sel.instantiate() for sel in config.layouts]
    dims = [d for layout in built for d in layout.mesh_dims]
    mesh = build_mesh(dims, config.parallel.sizes, fill="dp_shard" if "dp_shard" in dims else None, device_type="cpu")
    model = config.model.implementation.load().build(config.model.config, seed=0, device="cpu")
    precision = config.precision.instantiate()
    model = precision.prepare(model)
    for layout in built:
        model = layout.apply(model, mesh, precision)
    opt = config.optimizer.instantiate().build(model, mesh=mesh, layouts=built)
    dp_rank, dp_size = 0, 1
    for layout in built:
        info = layout.data_parallel()
        if info.size > 1:
            dp_rank, dp_size = info.rank, info.size
    rows = GLOBAL_BATCH // dp_size
    local = slice(dp_rank * rows, (dp_rank + 1) * rows)
    batches = [
        seeded_tokens((GLOBAL_BATCH, SEQ + 1), vocab_size=config.model.config.vocab_size, seed=step)
        for step in range(STEPS)
    ]

    def seen_loss() -> float:
        """Mean loss over every batch of the run (all ranks' rows), with the current weights."""
        with torch.no_grad():
            value = torch.stack([model(t[local, :-1], labels=t[local, 1:]) for t in batches]).mean()
        if dp_size > 1:
            dist.all_reduce(value)
            value /= dp_size
        return float(value)

    before = seen_loss()
    losses = []
    for step in range(STEPS):
        tokens = batches[step]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        loss = model(inputs[local], labels=labels[local])
        loss.backward()
        for layout in built:
            layout.finish_grad_sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(value)
            value /= dp_size
        losses.append(float(value))
    params = {}
    for name, p in model.named_parameters():
        params[name] = full_tensor(p.detach())  # ragged-aware: whole matrices live on one rank
    after = seen_loss()
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"losses": losses, "params": params, "seen": (before, after)}, out)


@pytest.mark.parametrize(
    ("optimizer", "options", "fsdp_options"),
    [
        ("adamw", (), ()),
        ("distributed-adamw", (), ()),
        # Muon on whole matrices: FSDP keeps each matrix on one rank, which orthogonalises it
        # locally (no gather in the optimizer), as one process does. Newton-Schulz in fp32: in
        # bf16, the gradients' reduction-order rounding (~1e-7) flips bf16 roundings (~1e-4).
        # Per head (split_heads): with Q, K and V orthogonalised as whole blocks, tiny's square 64 x 64 Q block
        # amplifies the two ranks' gradient reduction order to ~3e-5 after 3 steps (fp64 NS too); per head <= 8e-6.
        (
            "muon",
            ("--optimizer.ns_dtype=float32", "--optimizer.split_heads=true"),
            ("--parallel.fsdp.whole_params=matrices",),
        ),
    ],
)
def test_gpt_fsdp_two_ranks_matches_single_process(
    optimizer: str, options: tuple[str, ...], fsdp_options: tuple[str, ...], tmp_path: Path
) -> None:
    run_distributed(_train, 1, "single", optimizer, str(tmp_path / "single.pt"), *options)
    run_distributed(_train, 2, "fsdp", optimizer, str(tmp_path / "fsdp.pt"), *options, *fsdp_options, timeout=300)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert_rel_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), name="losses")
    before, after = single["seen"]
    assert after < before  # the steps lowered the loss on the batches they trained on (each batch is new data)
    assert_rel_close(torch.tensor(sharded["seen"]), torch.tensor(single["seen"]), name="loss on the seen batches")
    assert set(sharded["params"]) == set(single["params"])
    for name, ref in single["params"].items():
        assert_rel_close(sharded["params"][name], ref, name=f"parameter {name} after {STEPS} steps")


def test_every_installed_plugin_is_listed_without_torch() -> None:
    code = (
        "import sys, io, json, contextlib\n"
        "from mcore.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    main(['plugins', '--json'])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'listing': json.loads(buf.getvalue())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["torch"] is False, out.stderr
    listing = result["listing"]
    assert listing["problems"] == []
    by_dist: dict[str, set[tuple[str, str]]] = {}
    for row in listing["implementations"]:
        by_dist.setdefault(row["distribution"], set()).add((row["kind"], row["name"]))
    assert {("layout", "single"), ("precision", "bf16")} <= by_dist["mcore-core"]
    assert {("model", "gpt"), ("block", "attention"), ("block", "mla")} <= by_dist["mcore-models"]
    assert {("optimizer", n) for n in ("adamw", "distributed-adamw", "muon", "layerwise-distributed")} <= by_dist[
        "mcore-optim"
    ]
    assert {("layout", "fsdp"), ("layout", "hsdp")} <= by_dist["mcore-fsdp"]
