"""Registers, spills and shared memory of the GDN forward kernels in offline sm_90 builds: no GPU needed.

Why: the machine without a card can still tell whether a launch shape spills or fits two programs an SM
(``benchmarks/RESULTS.md``, "GDN forward v2"). Each kernel is compiled by ``triton.compile`` for
``GPUTarget("cuda", 90, 64)``; its PTX goes through the ptxas that Triton ships (``-v``) for registers and spill
bytes; shared memory comes from Triton's metadata, ``wgmma`` from the PTX. Pointer arguments are marked 16-byte
aligned, as the launcher marks torch's tensors (``--unaligned``: not, as the builds before 2026-12-07 were).

Usage: ``python offline_gdn_fwd.py [--dk 128 --dv 128 --precision tf32 --inverse doubling]`` (tf32: bf16 inputs;
ieee: fp32 inputs; ``--inverse blocks16``: the WY kernel's ``T`` as ``MCORE_SSM_GDN_INVERSE=blocks16`` computes it).
One line per (kernel, config).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mcore_ssm import gdn_triton, gdn_triton_state_v2

TARGET = GPUTarget("cuda", 90, 64)


def ptxas() -> str:
    """The ptxas Triton uses for sm_90 (``ptxas-blackwell``: the newer one, which reads Triton 3.9's PTX)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(folder, "ptxas-blackwell")


def build(
    fn: Any,
    pointers: dict[str, str],
    constants: dict[str, Any],
    warps: int,
    stages: int,
    *,
    aligned: bool = True,
    divisible: tuple[str, ...] = (),
) -> str:
    """One offline build: ``regs, spill stores/loads, shared KB, wgmma``. ``aligned``: every pointer argument
    marked 16-byte aligned (``tt.divisibility`` 16), as Triton's launcher marks the pointers of torch's allocations;
    without it (the builds before 2026-12-07) the loads cannot be vectorized and every element of a tile keeps its
    own 64-bit address, which inflates registers and spills. ``divisible``: integer arguments marked divisible by 16
    too (strides and widths the launcher would specialize so at the shapes built)."""
    signature = {**pointers, **{name: "constexpr" for name in constants}}
    marked = [name for name, kind in pointers.items() if (aligned and kind.startswith("*")) or name in divisible]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in marked}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
        target=TARGET,
        options={"num_warps": warps, "num_stages": stages},
    )
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    command = [ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name, "-o", os.devnull]
    try:
        log = subprocess.run(command, capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)  # the temporary file made above
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        return f"ptxas said: {log.strip()[-300:]}"
    return (
        f"{regs.group(1)} regs, spill {spill.group(1)}/{spill.group(2)} B, "
        f"shared {kernel.metadata.shared / 1024:.0f} KB, wgmma {'wgmma' in ptx}"
    )


def walk_builds(
    make: Any, pointers: dict[str, str], sizes: dict[str, int], bk: int, prec: dict[str, str], label: str
) -> None:
    """One line per autotuned config of the state walk, v1 and (dk <= 128) v2, with these pointer types."""
    flags = {"HAS_H0": False, "STORE_HT": False, **prec}
    for config in gdn_triton._chunk_state_tuned.configs:
        consts = {**sizes, "BK": bk, **config.kwargs, **flags}
        line = make(gdn_triton._chunk_state_kernel, pointers, consts, config.num_warps, config.num_stages)
        print(f"{label} v1 {config.kwargs} warps {config.num_warps} stages {config.num_stages}:", line)
    if bk <= 128:
        for config in gdn_triton_state_v2._state_v2_tuned.configs:
            for first in (False, True):  # MCORE_SSM_GDN_WALK_ORDER: segments, blocks
                consts = {**sizes, "KB": min(bk, 64), "NKB": max(1, bk // 64), **config.kwargs, **flags}
                consts["BLOCKS_FIRST"] = first
                line = make(
                    gdn_triton_state_v2._chunk_state_v2_kernel, pointers, consts, config.num_warps, config.num_stages
                )
                order = "blocks first" if first else "segments first"
                print(f"{label} v2 {config.kwargs} warps {config.num_warps} stages {config.num_stages} {order}:", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--qk-heads", type=int, default=16)
    parser.add_argument("--v-heads", type=int, default=32)
    parser.add_argument("--precision", choices=("tf32", "ieee"), default="tf32")
    parser.add_argument("--unaligned", action="store_true", help="pointers not marked 16-byte aligned")
    parser.add_argument("--inverse", choices=("doubling", "blocks16"), default="doubling", help="the WY kernel's T")
    args = parser.parse_args()
    make = functools.partial(build, aligned=not args.unaligned)
    data = "*bf16" if args.precision == "tf32" else "*fp32"
    f32, i64 = "*fp32", "*i64"
    bk = max(16, triton.next_power_of_2(args.dk))
    sizes = {"HK": args.qk_heads, "HV": args.v_heads, "DK": args.dk, "DV": args.dv, "C": 64}
    prec = {"PRECISION": args.precision}

    wy = dict.fromkeys(("k_ptr", "v_ptr", "w_ptr", "u_ptr"), data)
    wy |= {"g_ptr": f32, "beta_ptr": f32, "cum_ptr": f32, "chunk_start_ptr": i64, "chunk_len_ptr": i64, "t_ptr": f32}
    wy_flags = {"STORE_T": False, "BLOCKS16": args.inverse == "blocks16"}
    for bw, bv, warps in ((bk, 64, 8), (min(64, bk), 64, 4), (min(64, bk), 32, 8)):
        consts = {**sizes, "BK": bk, "BV": bv, "BW": bw, **prec, **wy_flags}
        line = make(gdn_triton._chunk_wy_kernel, wy, consts, warps, 3)
        print(f"wy {args.inverse} BW {bw} BV {bv} warps {warps}:", line)

    walk = dict.fromkeys(("k_ptr", "w_ptr", "u_ptr", "vnew_ptr", "states_ptr"), data)
    walk |= {"cum_ptr": f32, "h0_ptr": f32, "ht_ptr": f32, "starts_ptr": i64, "lengths_ptr": i64}
    walk["first_chunk_ptr"] = i64
    walk_builds(make, walk, sizes, bk, prec, "walk")

    out = dict.fromkeys(("q_ptr", "k_ptr", "vnew_ptr", "states_ptr", "out_ptr"), data)
    out |= {"cum_ptr": f32, "chunk_start_ptr": i64, "chunk_len_ptr": i64, "scale": "fp32"}
    for config in gdn_triton._chunk_output_tuned.configs:
        consts = {**sizes, "BK": bk, **config.kwargs, **prec}
        line = make(gdn_triton._chunk_output_kernel, out, consts, config.num_warps, config.num_stages)
        print(f"output {config.kwargs} warps {config.num_warps} stages {config.num_stages}:", line)


if __name__ == "__main__":
    main()
