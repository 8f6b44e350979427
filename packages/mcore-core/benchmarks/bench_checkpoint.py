"""Time checkpoint save and load of a ~1B-parameter training state, with and without checksums.

The state is random tensors shaped like a 0.9B Llama (hidden 2048, 16 layers, FFN 5632,
vocab 32000, untied head): fp32 parameters plus AdamW's two fp32 moments, 12 bytes a
parameter, about 11 GB. ``--params`` picks another size of the same family (the default on
CPU is small). Variants, run interleaved ``--repeats`` times (the order rotates each round):

* ``save_dcp``: ``torch.distributed.checkpoint.save`` of the same tensors alone (the floor);
* ``save``: ``CheckpointManager.save`` (finiteness check, staging, DCP, per-file checksums,
  manifest), with ``save_blocking`` its part before the background write starts;
* ``load_verified`` / ``load_unverified``: ``load_checkpoint`` with and without checksum
  verification (``--cold`` evicts the files from the page cache before each load);
* ``hash_files``: the checksums of one checkpoint's files alone (threads over 64 MiB blocks),
  and one line of single-core throughput of CRC-32, Adler-32, BLAKE2b and SHA-1 in memory.

Each variant prints one JSON line: median, min, max and interquartile range in seconds, the
bytes moved and GB/s at the median. ``--out FILE`` also appends the lines to ``FILE``.

    python packages/mcore-core/benchmarks/bench_checkpoint.py --device cuda --repeats 5
    python packages/mcore-core/benchmarks/bench_checkpoint.py --device cpu --params 2e7 --repeats 3

It needs only torch and this repository's ``mcore`` (found beside the script when not installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

try:
    import mcore  # noqa: F401
except ImportError:  # run from a checkout where mcore is not installed (e.g. the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mcore.checkpoint.manifest import checksum_files, default_threads
from mcore.checkpoint.store import CheckpointManager, load_checkpoint, remove_checkpoint
from mcore.precision.basic import FP32

VOCAB = 32_000


def shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-like model with about ``params`` parameters (0.9e9: hidden 2048, 16 layers)."""
    hidden = 2048 if params >= 5e8 else 1024 if params >= 1.2e8 else 512 if params >= 2e7 else 256
    ffn = int(hidden * 2.75) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
    out: dict[str, tuple[int, ...]] = {"embed.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"layers.{i}"
        out |= {f"{p}.attn_norm.weight": (hidden,), f"{p}.mlp_norm.weight": (hidden,)}
        out |= {f"{p}.attn.{n}.weight": (hidden, hidden) for n in "qkvo"}
        out |= {f"{p}.mlp.gate.weight": (ffn, hidden), f"{p}.mlp.up.weight": (ffn, hidden)}
        out[f"{p}.mlp.down.weight"] = (hidden, ffn)
    out |= {"norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    return out


def build_model(params: float, device: torch.device, dtype: torch.dtype) -> nn.Module:
    root = nn.Module()
    for name, shape in shapes(params).items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02))
    return root


class BenchAdam:
    """AdamW's state (two fp32 moments and a step per parameter), keyed by name."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {
            n: {
                "exp_avg": torch.randn(p.shape, device=p.device) * 1e-3,
                "exp_avg_sq": torch.rand(p.shape, device=p.device) * 1e-6,
                "step": torch.tensor(100.0),
            }
            for n, p in model.named_parameters()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "lr": [3e-4]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for name, entry in sd["state"].items():
            for k, v in entry.items():
                if self.state[name][k] is not v:
                    self.state[name][k].copy_(v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (the next read comes from the disk)."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def summary(name: str, times: list[float], nbytes: int, **extra: Any) -> dict[str, Any]:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    med = statistics.median(ts)
    return {
        "variant": name,
        "n": len(ts),
        "median_s": round(med, 4),
        "min_s": round(ts[0], 4),
        "max_s": round(ts[-1], 4),
        "iqr_s": round(q[2] - q[0], 4),
        "bytes": nbytes,
        "gb_per_s": round(nbytes / med / 1e9, 3) if med > 0 else None,
        **extra,
    }


def hash_speeds(nbytes: int) -> dict[str, Any]:
    """Single-core GiB/s of candidate checksums over ``nbytes`` of random data in memory."""
    block = 16 << 20
    buf = memoryview(os.urandom(min(block, nbytes)) * max(1, nbytes // block))
    funcs: dict[str, Callable[[], Any]] = {
        "crc32": lambda: [zlib.crc32(buf[i : i + block]) for i in range(0, len(buf), block)],
        "adler32": lambda: [zlib.adler32(buf[i : i + block]) for i in range(0, len(buf), block)],
    }

    def hasher(algo: str) -> Callable[[], Any]:
        return lambda: [hashlib.new(algo, buf[i : i + block]) for i in range(0, len(buf), block)]

    funcs |= {algo: hasher(algo) for algo in ("blake2b", "sha1")}
    out: dict[str, Any] = {"variant": "hash_speed_1core", "bytes": len(buf)}
    for name, fn in funcs.items():
        best = min(_timed(fn) for _ in range(3))
        out[f"{name}_gib_per_s"] = round(len(buf) / best / 2**30, 2)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=None, help="parameters (default 0.9e9 on CUDA, 2e7 on CPU)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="parameter dtype (moments fp32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--cold", action="store_true", help="evict checkpoint files from the page cache before loads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    params = args.params or (0.9e9 if device.type == "cuda" else 2e7)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    warnings.simplefilter("ignore")

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    torch.manual_seed(0)
    model = build_model(params, device, dtype)
    opt, prec = BenchAdam(model), FP32()
    n_params = sum(p.numel() for p in model.parameters())
    base = Path(tempfile.mkdtemp(prefix="mcore-bench-ckpt-", dir=args.dir))
    root = base / "checkpoints"
    emit(
        {
            "variant": "setup",
            "params": n_params,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(),
            "hash_threads": default_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "dir": str(base),
            "cold": args.cold,
        }
    )
    meta = {"config": {"optimizer": {"name": "bench-adamw"}, "precision": {"recipe": "fp32"}}, "model_name": "bench"}
    manager = CheckpointManager(root, keep_last=10**6, async_save=True, rank=0, world_size=1)
    step = 0
    times: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}

    def record(name: str, seconds: float, nbytes: int) -> None:
        times.setdefault(name, []).append(seconds)
        sizes[name] = nbytes

    def save() -> None:
        nonlocal step
        step += 1
        sync(device)
        t0 = time.perf_counter()
        manager.save(step, model=model, optimizer=opt, precision=prec, meta=meta, rank_extra={})
        t1 = time.perf_counter()
        path = manager.wait()
        t2 = time.perf_counter()
        assert path is not None
        record("save_blocking", t1 - t0, dir_bytes(path))
        record("save", t2 - t0, dir_bytes(path))
        t3 = time.perf_counter()
        checksum_files(path, [f.name for f in path.iterdir()])
        record("hash_files", time.perf_counter() - t3, dir_bytes(path))
        for old in sorted(root.glob("step_*"))[:-1]:
            remove_checkpoint(old)

    def save_dcp() -> None:
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        for name, entry in opt.state.items():
            tensors |= {f"optimizer/state/{name}/{k}": v for k, v in entry.items()}
        target = base / "dcp_only"
        sync(device)
        t0 = time.perf_counter()
        staged = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        writer = dcp.FileSystemWriter(str(target), single_file_per_rank=True, thread_count=1)
        dcp.save(staged, storage_writer=writer, no_dist=True)
        record("save_dcp", time.perf_counter() - t0, dir_bytes(target))
        shutil.rmtree(target)

    def load(verify: bool) -> Callable[[], None]:
        def run() -> None:
            path = manager.last_good
            assert path is not None
            if args.cold:
                evict(path)
            sync(device)
            t0 = time.perf_counter()
            load_checkpoint(path, model=model, optimizer=opt, precision=prec, verify_checksums=verify)
            sync(device)
            record("load_verified" if verify else "load_unverified", time.perf_counter() - t0, dir_bytes(path))

        return run

    save()  # warm-up: allocations, imports, the first checkpoint to load
    times.clear()
    variants: list[Callable[[], None]] = [save, save_dcp, load(True), load(False)]
    for r in range(args.repeats):
        shift = r % len(variants)
        for fn in variants[shift:] + variants[:shift]:
            fn()
    for name in ("save_dcp", "save", "save_blocking", "hash_files", "load_unverified", "load_verified"):
        emit(summary(name, times[name], sizes[name]))
    emit(hash_speeds(min(1 << 30, sizes["save"])))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
