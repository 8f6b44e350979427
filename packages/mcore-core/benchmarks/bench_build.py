"""Time and peak memory to build a model: whole on the device (today's way) vs meta + ``init_params``.

The model is a Llama-shaped stand-in whose blocks declare their inits (``param_specs``, as a
model that says ``supports_meta_init`` does) and also keep a ``reset_parameters(generator)``:

* ``whole``: built on the meta device, ``to_empty`` on the device, every weight drawn in fp32 on
  the CPU by one seeded ``torch.Generator`` and copied over (what gpt's ``build`` does today),
  then cast to ``--dtype`` (the precision recipe's ``prepare``);
* ``meta``: built on meta, cast on meta, then ``mcore.construct.init_params`` allocates it on
  the device and fills it from the declared inits (``mcore.init_rng``; one process, so each
  parameter is whole: with a sharding layout each rank would fill only its part).

Shapes: ``--shape llama3-8b`` (hidden 4096, 32 layers, FFN 14336, 8 KV heads of 128, vocab
128256, untied head: 8.03e9 parameters) or ``--params N`` (a Llama-like model of about N).
Each repeat of each variant runs in a fresh process (so that its peak RSS is its own); the
order alternates. One JSON line per variant: seconds (median, min, max), peak host RSS of the
process and its rise during the build (GiB), peak device memory allocated (GiB, CUDA).

    python packages/mcore-core/benchmarks/bench_build.py --device cuda --shape llama3-8b --repeats 3
    python packages/mcore-core/benchmarks/bench_build.py --device cpu --params 1e8 --repeats 3

It needs only torch and this repository's ``mcore`` (found beside the script when not installed).
Note: on CPU, ``init_rng`` draws about 18M normals a second per thread, so keep ``--params`` small.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import mcore  # noqa: F401
except ImportError:  # run from a checkout where mcore is not installed (e.g. the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mcore.construct import init_params
from mcore.params import Init, ParamSpec

STD = 0.02
LLAMA3_8B = {"hidden": 4096, "layers": 32, "ffn": 14336, "kv": 1024, "vocab": 128256}


def llama_like(params: float) -> dict[str, int]:
    """Shapes of a Llama-like model with about ``params`` parameters (vocab 32000, untied head)."""
    hidden = 2048 if params >= 5e8 else 1024 if params >= 1.2e8 else 512 if params >= 2e7 else 256
    ffn = int(hidden * 2.75) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((params - 2 * 32000 * hidden - hidden) / per_layer))
    return {"hidden": hidden, "layers": layers, "ffn": ffn, "kv": hidden, "vocab": 32000}


@torch.no_grad()
def _draw(linear: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    """Today's init: fp32 values drawn on the CPU, copied to the parameter's device."""
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)


class Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec("norm", init=Init("ones"))}

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


class Attention(nn.Module):
    def __init__(self, hidden: int, kv: int, out_std: float) -> None:
        super().__init__()
        self.out_std = out_std
        self.q, self.k, self.v = (
            nn.Linear(hidden, hidden, False),
            nn.Linear(hidden, kv, False),
            nn.Linear(hidden, kv, False),
        )
        self.o = nn.Linear(hidden, hidden, False)

    def param_specs(self) -> dict[str, ParamSpec]:
        specs = {f"{n}.weight": ParamSpec("matrix", init=Init("normal", std=STD)) for n in "qkv"}
        return specs | {"o.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std))}

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for n in "qkv":
            _draw(getattr(self, n), STD, generator)
        _draw(self.o, self.out_std, generator)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, out_std: float) -> None:
        super().__init__()
        self.out_std = out_std
        self.gate, self.up, self.down = (
            nn.Linear(hidden, ffn, False),
            nn.Linear(hidden, ffn, False),
            nn.Linear(ffn, hidden, False),
        )

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "gate.weight": ParamSpec("matrix", init=Init("normal", std=STD)),
            "up.weight": ParamSpec("matrix", init=Init("normal", std=STD)),
            "down.weight": ParamSpec("matrix", init=Init("normal", std=self.out_std)),
        }

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _draw(self.gate, STD, generator)
        _draw(self.up, STD, generator)
        _draw(self.down, self.out_std, generator)


class Layer(nn.Module):
    def __init__(self, shape: dict[str, int]) -> None:
        super().__init__()
        out_std = STD / math.sqrt(2 * shape["layers"])
        self.attn_norm, self.mlp_norm = Norm(shape["hidden"]), Norm(shape["hidden"])
        self.attn = Attention(shape["hidden"], shape["kv"], out_std)
        self.mlp = MLP(shape["hidden"], shape["ffn"], out_std)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in (self.attn_norm, self.attn, self.mlp_norm, self.mlp):
            m.reset_parameters(generator)


class Model(nn.Module):
    def __init__(self, shape: dict[str, int]) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape["vocab"], shape["hidden"])
        self.layers = nn.ModuleList(Layer(shape) for _ in range(shape["layers"]))
        self.norm = Norm(shape["hidden"])
        self.head = nn.Linear(shape["hidden"], shape["vocab"], bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "embed.weight": ParamSpec("embedding", init=Init("normal", std=STD)),
            "head.weight": ParamSpec("head", init=Init("normal", std=STD)),
        }

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=generator) * STD)
        for layer in self.layers:
            layer.reset_parameters(generator)  # type: ignore[operator]
        self.norm.reset_parameters(generator)
        _draw(self.head, STD, generator)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(variant: str, shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Build once in this process; what it cost."""
    if device.type == "cuda":
        torch.cuda.init()
        torch.empty(1, device=device)  # the context exists before the baseline
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _rss_bytes()
    start = time.perf_counter()
    with torch.device("meta"):
        model = Model(shape)
    if variant == "whole":
        model.to_empty(device=device)
        model.reset_parameters(torch.Generator().manual_seed(seed))
        model = model.to(dtype)
    else:
        model = model.to(dtype)
        init_params(model, seed=seed, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == device.type and p.dtype == dtype for p in model.parameters())
    return {
        "variant": variant,
        "params": params,
        "seconds": seconds,
        "peak_rss_gib": peak_rss / 2**30,
        "rss_rise_gib": (peak_rss - base_rss) / 2**30,
        "peak_device_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    return {
        "variant": runs[0]["variant"],
        "shape": args.shape or f"params={args.params:g}",
        "params": runs[0]["params"],
        "dtype": args.dtype,
        "device": args.device,
        "repeats": len(runs),
        "seconds_median": statistics.median(secs),
        "seconds_min": min(secs),
        "seconds_max": max(secs),
        "peak_rss_gib_max": max(r["peak_rss_gib"] for r in runs),
        "rss_rise_gib_max": max(r["rss_rise_gib"] for r in runs),
        "peak_device_gib_max": None if runs[0]["peak_device_gib"] is None else max(r["peak_device_gib"] for r in runs),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=["llama3-8b"], default=None)
    parser.add_argument("--params", type=float, default=1e8, help="about this many parameters (without --shape)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="whole,meta")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = LLAMA3_8B if args.shape == "llama3-8b" else llama_like(args.params)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.child:
        print(json.dumps(child(args.child, shape, torch.device(args.device), dtype, args.seed)))
        return
    variants = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for variant in variants if i % 2 == 0 else variants[::-1]:  # alternate the order
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[variant][-1]), file=sys.stderr)
    for variant in variants:
        line = json.dumps(summarize(runs[variant], args))
        print(line)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
