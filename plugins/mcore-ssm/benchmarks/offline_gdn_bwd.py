"""Registers, spills and shared memory of the GDN backward kernels in offline sm_90 builds: no GPU needed.

Why: the sibling of ``offline_gdn_fwd.py`` (same method: ``triton.compile`` for ``GPUTarget("cuda", 90, 64)``, then
the ptxas Triton ships, ``-v``) for what one backward call runs: the forward's fp32 rerun (WY factors and state walk,
v1 and v2 launches), ``_local_du_kernel``, the reverse state walk (``_chunk_state_bwd_kernel`` and the opt-in
``gdn_triton_state_bwd_v2`` configs) and the three kernels of the split chunk-terms backward (with ``T`` recomputed,
and ``_pairs_bwd_kernel`` loading the ``T`` the rerun stored: ``MCORE_SSM_GDN_PAIRS_T=saved``).
``benchmarks/RESULTS.md``, "GDN backward, offline".

Usage: ``python offline_gdn_bwd.py [--dk 128 --dv 128 --precision tf32 --inverse doubling --scratch fp32]`` (tf32:
bf16 inputs; ieee: fp32 inputs; ``--inverse blocks16``: ``T`` in the rerun's WY kernel and the recomputing
``_pairs_bwd_kernel`` as ``MCORE_SSM_GDN_INVERSE=blocks16`` computes it; ``--scratch inputs``: the rerun's factors
and states, ``dS'`` and ``dR_u`` in bf16, as ``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` keeps them for bf16 inputs). One
line per (kernel, config).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import triton
from offline_gdn_fwd import build, walk_builds

from mcore_ssm import (
    gdn_triton,
    gdn_triton_bwd,
    gdn_triton_chunk_bwd_split,
    gdn_triton_state_bwd_v2,
)

Build = Callable[..., str]  # offline_gdn_fwd.build with its alignment chosen
PARTS = ("rerun", "reverse", "terms")


def rerun(
    make: Build, sizes: dict[str, int], bk: int, prec: dict[str, str], data: str, *, blocks16: bool, low: str
) -> None:
    """The forward's kernels as the backward launches them: factors and states in ``low`` (``*fp32``, or ``*bf16``
    with ``--scratch inputs``) from ``data`` inputs (``blocks16``: ``T`` from 16 x 16 diagonal blocks)."""
    f32, i64 = "*fp32", "*i64"
    wy = {"k_ptr": data, "v_ptr": data, "w_ptr": low, "u_ptr": low, "g_ptr": f32, "beta_ptr": f32, "cum_ptr": f32}
    wy |= {"chunk_start_ptr": i64, "chunk_len_ptr": i64, "t_ptr": f32}
    narrow_warps = 4 if prec["PRECISION"] == "tf32" else 8
    launches = (("v1", bk, 64, 8), ("v2", min(64, bk), 64 if narrow_warps == 4 else 32, narrow_warps))
    for name, bw, bv, warps in launches:
        for store_t in (False, True):
            consts = {**sizes, "BK": bk, "BV": bv, "BW": bw, **prec, "STORE_T": store_t, "BLOCKS16": blocks16}
            line = make(gdn_triton._chunk_wy_kernel, wy, consts, warps, 3)
            print(f"rerun wy {name} BW {bw} BV {bv} warps {warps} store T {store_t}:", line)

    walk = {"k_ptr": data, **dict.fromkeys(("w_ptr", "u_ptr", "vnew_ptr", "states_ptr"), low), "cum_ptr": f32}
    walk |= {"h0_ptr": f32, "ht_ptr": f32, "starts_ptr": i64, "lengths_ptr": i64, "first_chunk_ptr": i64}
    walk_builds(make, walk, sizes, bk, prec, "rerun walk")


def reverse(make: Build, sizes: dict[str, int], bk: int, prec: dict[str, str], data: str, *, low: str) -> None:
    """``_local_du_kernel`` and the reverse state walks (v1 as launched, v2's autotuning configs; ``W`` and ``dS'``
    in ``low``)."""
    f32, i64 = "*fp32", "*i64"
    local = {"q_ptr": data, "k_ptr": data, "g_ptr": f32, "dout_ptr": data, "du_ptr": f32}
    local |= {"chunk_start_ptr": i64, "chunk_len_ptr": i64, "scale": "fp32"}
    bv = max(16, min(64, triton.next_power_of_2(sizes["DV"])))
    print("local du:", make(gdn_triton_bwd._local_du_kernel, local, {**sizes, "BK": bk, "BV": bv, **prec}, 8, 1))

    walk = {"q_ptr": data, "k_ptr": data, "w_ptr": low, "g_ptr": f32, "dout_ptr": data}
    walk |= {**dict.fromkeys(("dht_ptr", "dh0_ptr", "du_ptr"), f32), "dstates_ptr": low}
    walk |= {"starts_ptr": i64, "lengths_ptr": i64, "first_chunk_ptr": i64, "scale": "fp32"}
    flags = {"HAS_DHT": False, **prec}
    bv = max(16, min(32, triton.next_power_of_2(sizes["DV"])))
    line = make(gdn_triton_bwd._chunk_state_bwd_kernel, walk, {**sizes, "BK": bk, "BV": bv, **flags}, 8, 1)
    print(f"state bwd v1 BV {bv} warps 8 stages 1:", line)
    if bk <= 128:
        for config in gdn_triton_state_bwd_v2.CONFIGS:
            consts = {**sizes, "KB": min(bk, 64), "NKB": max(1, bk // 64), **config.kwargs, **flags}
            line = make(gdn_triton_state_bwd_v2._state_bwd_v2_kernel, walk, consts, config.num_warps, config.num_stages)
            print(f"state bwd v2 {config.kwargs} warps {config.num_warps} stages {config.num_stages}:", line)


def terms(
    make: Build, sizes: dict[str, int], bk: int, prec: dict[str, str], data: str, *, blocks16: bool, low: str
) -> None:
    """The split chunk-terms backward as ``chunk_terms_bwd_split`` launches it (``blocks16``: a recomputed ``T``
    from 16 x 16 diagonal blocks; ``U``, ``S``, ``dS'``, ``dR_u`` in ``low``)."""
    f32, i64 = "*fp32", "*i64"
    split = gdn_triton_chunk_bwd_split
    consts = {**sizes, "BKS": min(64, bk), "BV": max(16, min(32, triton.next_power_of_2(sizes["DV"]))), **prec}
    pairs = {"q_ptr": data, "k_ptr": data, "v_ptr": data, "g_ptr": f32, "beta_ptr": f32, "u_ptr": low}
    pairs |= {"dout_ptr": data, "du_ptr": f32, "dv_ptr": data, "dru_ptr": low}
    pairs |= dict.fromkeys(("dqh_ptr", "dkh_ptr", "dg_ptr", "dbeta_ptr"), f32)
    pairs |= {"chunk_start_ptr": i64, "chunk_len_ptr": i64, "t_ptr": f32, "scale": "fp32"}
    two_per_sm = prec["PRECISION"] == "tf32" and bk == 128  # chunk_terms_bwd_split's launch with T saved
    wide = {"BV": min(64, max(16, triton.next_power_of_2(sizes["DV"])))} if two_per_sm else {}
    for saved, warps, bv in ((False, 8, {}), (True, 8, {}), (True, 4 if two_per_sm else 8, wide)):
        flags = {"SAVED_T": saved, "BLOCKS16": blocks16}
        line = make(split._pairs_bwd_kernel, pairs, {**consts, **bv, **flags}, warps, 1)
        print(f"pairs (T {'saved' if saved else 'recomputed'}) BV {bv.get('BV', consts['BV'])} warps {warps}:", line)
    states = {"q_ptr": data, "k_ptr": data, "g_ptr": f32, "beta_ptr": f32, "u_ptr": low, "states_ptr": low}
    states |= {"dstates_ptr": low, "dout_ptr": data, "dru_ptr": low, "dqh_ptr": f32, "dkh_ptr": f32}
    states |= {"dq_ptr": data, "dk_ptr": data, **dict.fromkeys(("drw_k_ptr", "dqe_q_ptr", "dkt_k_ptr"), f32)}
    states |= {"dgamma_ptr": f32, "chunk_start_ptr": i64, "chunk_len_ptr": i64, "plane": "i32", "scale": "fp32"}
    print("states (terms) warps 8:", make(split._states_bwd_kernel, states, consts, 8, 1))
    gate = {"g_ptr": f32, "beta_ptr": f32, **dict.fromkeys(("drw_k_ptr", "dqe_q_ptr", "dkt_k_ptr", "dgamma_ptr"), f32)}
    gate |= {"dg_ptr": f32, "dbeta_ptr": f32, "chunk_start_ptr": i64, "chunk_len_ptr": i64, "plane": "i32"}
    blocks = triton.cdiv(sizes["DK"], min(64, bk))
    print("gate warps 4:", make(split._gate_bwd_kernel, gate, {"HV": sizes["HV"], "KB": blocks, "C": 64}, 4, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--qk-heads", type=int, default=16)
    parser.add_argument("--v-heads", type=int, default=32)
    parser.add_argument("--precision", choices=("tf32", "ieee"), default="tf32")
    parser.add_argument("--unaligned", action="store_true", help="pointers not marked 16-byte aligned")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--inverse", choices=("doubling", "blocks16"), default="doubling", help="how T is computed")
    parser.add_argument("--scratch", choices=("fp32", "inputs"), default="fp32", help="MCORE_SSM_GDN_BWD_SCRATCH")
    args = parser.parse_args()
    make = functools.partial(build, aligned=not args.unaligned)
    data = "*bf16" if args.precision == "tf32" else "*fp32"
    bk = max(16, triton.next_power_of_2(args.dk))
    sizes = {"HK": args.qk_heads, "HV": args.v_heads, "DK": args.dk, "DV": args.dv, "C": 64}
    prec = {"PRECISION": args.precision}
    low = data if args.scratch == "inputs" else "*fp32"  # fp32 inputs keep fp32 scratch either way
    print(f"inverse {args.inverse}, scratch {low}")
    blocks16 = args.inverse == "blocks16"
    parts = {"rerun": functools.partial(rerun, blocks16=blocks16, low=low)}
    parts["reverse"] = functools.partial(reverse, low=low)
    parts["terms"] = functools.partial(terms, blocks16=blocks16, low=low)
    for part in args.only:
        parts[part](make, sizes, bk, prec, data)


if __name__ == "__main__":
    main()
