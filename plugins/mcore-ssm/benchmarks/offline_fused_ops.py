"""Registers and spills of the fused conv and gated-norm kernels (``conv_triton``, ``norm_triton``) in offline sm_90
builds: no GPU needed (``offline_gdn_fwd.build``: ``triton.compile`` for ``GPUTarget("cuda", 90, 64)``, the PTX
through Triton's ptxas, pointers marked 16-byte aligned as the launcher marks torch's).

Why: the machine without a card can still tell whether a launch shape compiles and spills. The shapes are
``hybrid-bench``'s GDN mixer (q/k heads of 128 with the L2 norm, v without, the gated norm per value head of 128) and
a Mamba2 norm group of 256, with the launch parameters the wrappers pick.

Usage: ``python offline_fused_ops.py [--dtype bf16|fp32]``. One line per kernel.
"""

from __future__ import annotations

import argparse
from typing import Any

import triton
from offline_gdn_fwd import build as build_kernel

from mcore_ssm import conv_triton, norm_triton

#: Integer arguments the launcher marks divisible by 16 at these shapes (row strides and widths: 6160 for the GDN
#: block's fused projection, the channel counts), as Triton specializes them.
DIVISIBLE = ("C", "sx_b", "sx_t", "F", "sx", "sg")


def build(fn: Any, args: dict[str, str], constants: dict[str, Any], warps: int) -> str:
    """One offline build (``offline_gdn_fwd.build``, one pipelining stage): pointers and ``DIVISIBLE`` integers
    marked divisible by 16."""
    return build_kernel(fn, args, constants, warps, 1, divisible=DIVISIBLE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    data, f32, i64, i32 = f"*{args.dtype}", "*fp32", "*i64", "i32"
    scalars = {"N": i32, "T": i32, "C": i32, "sx_b": i32, "sx_t": i32, "eps": "fp32"}
    for name, norm in (("q/k l2norm", 128), ("v", None)):
        group, block_c = conv_triton._blocks(2048, norm)
        flags = {"K": 4, "HAS_BIAS": False, "HAS_POS": True, "NORM": norm is not None, "G": group, "BC": block_c}
        fwd = {"X": data, "W": data, "BIAS": data, "POS": i64, "Y": data, **scalars}
        block_t, warps = conv_triton._fwd_launch(block_c)
        consts = {**flags, "BT": block_t}
        print(f"conv fwd {name} BT {block_t} warps {warps}:", build(conv_triton._conv_fwd_kernel, fwd, consts, warps))
        bwd = {"X": data, "W": data, "BIAS": data, "POS": i64, "DY": data, "DX": data, "DW": f32, "DB": f32}
        bwd |= {**scalars, "tiles": i32}
        block_t, warps = conv_triton._bwd_launch(block_c)
        consts = {**flags, "KP": triton.next_power_of_2(4), "BT": block_t}
        print(f"conv bwd {name} BT {block_t} warps {warps}:", build(conv_triton._conv_bwd_kernel, bwd, consts, warps))
        grad = {"X": data, "W": data, "BIAS": data, "POS": i64, "DY": data, "DA": f32, "DW": f32, "DB": f32}
        grad |= {**scalars, "tiles": i32}
        block_t, warps = conv_triton._grad_launch(block_c)
        consts = {**flags, "KP": triton.next_power_of_2(4), "BT": block_t}
        line = build(conv_triton._conv_grad_kernel, grad, consts, warps)
        print(f"conv bwd da {name} BT {block_t} warps {warps}:", line)
    dx = {"DA": f32, "W": data, "POS": i64, "DX": data, "N": i32, "T": i32, "C": i32}
    block_t, block_c, warps = conv_triton._dx_launch(2048)
    consts = {"K": 4, "HAS_POS": True, "BT": block_t, "BC": block_c}
    line = build(conv_triton._conv_dx_kernel, dx, consts, warps)
    print(f"conv bwd dx ({block_t}, {block_c}) warps {warps}:", line)
    for name, group, before, shared in (("gdn", 128, True, True), ("mamba2", 256, False, False)):
        block_g = triton.next_power_of_2(group)
        block_t = norm_triton._tile_tokens(block_g)
        flags = {"G": group, "BEFORE": before, "W_SHARED": shared, "BT": block_t, "BG": block_g}
        sizes = {"M": i32, "F": i32, "sx": i32, "sg": i32, "eps": "fp32"}
        fwd = {"X": data, "GATE": data, "W": data, "Y": data, **sizes}
        print(f"norm fwd {name} BT {block_t} warps 4:", build(norm_triton._norm_fwd_kernel, fwd, flags, 4))
        bwd = {"X": data, "GATE": data, "W": data, "DY": data, "DX": data, "DG": data, "DW": f32, **sizes, "tiles": i32}
        warps = 8 if block_t * block_g >= 4096 else 4
        print(f"norm bwd {name} BT {block_t} warps {warps}:", build(norm_triton._norm_bwd_kernel, bwd, flags, warps))


if __name__ == "__main__":
    main()
