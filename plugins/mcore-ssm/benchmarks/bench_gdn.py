"""The chunked gated delta rule, forward and forward + backward: our Triton kernel against the torch references and fla.

Usage (GPU): ``python bench_gdn.py [--batch 8 --seq 4096 --qk-heads 16 --v-heads 32 --head-dim 128 --docs 1]``.
Smoke test anywhere: ``python bench_gdn.py --device cpu --tiny`` (tiny shapes, fp32, no Triton).

Candidates, each on the same inputs (bf16 on CUDA): q, k ``(B, T, hk, dk)`` L2-normalised, v ``(B, T, hv, dv)``,
``g = -softplus`` decay and ``beta = sigmoid``, ``--docs`` equal documents per row (``cu_seqlens``):

* ``triton``: ``mcore_ssm.gdn_triton.gated_delta_rule_triton`` (Triton forward and backward; the backward
  differentiates the per-chunk terms in Triton), with whatever ``MCORE_SSM_GDN_FWD`` says (unset: v2);
* ``triton_v1``, ``triton_v2``: the same with ``MCORE_SSM_GDN_FWD`` set to ``v1`` (the first forward, an opt-in
  since 2026-12-07) or ``v2`` (the default: narrow WY launch, ``gdn_triton_state_v2`` walk) around each call; the
  backward reruns the same forward in fp32. Until 2026-12-07 ``triton`` was v1: compare the two forwards with
  ``triton_v1 triton_v2``;
* ``triton_bwd_before``: the backward before 2026-12-07 (``MCORE_SSM_GDN_BWD_SCRATCH=fp32``,
  ``MCORE_SSM_GDN_STATE_BWD=v1``); ``triton_state_bwd_v2``, ``triton_bwd_scratch_inputs`` and the ``walk_blocks``
  pair are pinned against it (each changes one thing), so their names measure what they did that day;
  ``triton_bwd_scratch_inputs_state_bwd_v2`` is today's default; ``triton_walk_blocks_now`` the default + blocks;
* ``triton_state_bwd_v2``, ``triton_pairs_t_saved``, ``triton_bwd_opt_in``: the backward's opt-ins pinned around
  each call (``MCORE_SSM_GDN_STATE_BWD=v2``, ``MCORE_SSM_GDN_PAIRS_T=saved``, both; read when the forward starts,
  so the backward runs them); compare with ``triton`` in the same call;
* ``triton_inverse_blocks16``, ``triton_inverse_blocks16_pairs_t_saved``: ``MCORE_SSM_GDN_INVERSE=blocks16`` pinned
  around each call (each chunk's ``T`` from 16 x 16 diagonal blocks by substitution and two doubling levels, in the
  WY kernel of the forward and of the backward's rerun and in the split terms' recomputation), alone and with
  ``MCORE_SSM_GDN_PAIRS_T=saved``; compare with ``triton`` and ``triton_pairs_t_saved`` in the same call;
* ``triton_bwd_scratch_inputs``, ``triton_bwd_scratch_inputs_state_bwd_v2``: ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``
  pinned around each call (the backward's rerun factors and states, ``dS'`` and ``dR_u`` in bf16, the dots on them on
  bf16 operands), alone and with ``MCORE_SSM_GDN_STATE_BWD=v2``; compare with ``triton`` and
  ``triton_state_bwd_v2`` in the same call (the forward is the same: compare forward + backward);
* ``triton_walk_blocks``, ``triton_bwd_scratch_inputs_walk_blocks``: ``MCORE_SSM_GDN_WALK_ORDER=blocks`` pinned (the
  v2 state walk, forward and the backward's rerun, with the value blocks of one (segment, head) launched together:
  same results), alone and with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``; compare with ``triton`` (forward too) and
  ``triton_bwd_scratch_inputs`` in the same call;
* ``torch_chunked``: ``mcore_ssm.gdn_reference.chunk_gated_delta_rule`` eager;
* ``torch_chunked_compiled``: the same under ``torch.compile`` (the issue's baseline: goal >= 3x);
* ``fla``: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (the ``fla-core`` wheel) when it imports, q and k
  repeated to the value heads beforehand (outside the timing).

Timing: ``mcore_testing.bench.interleaved`` (warm-up, then rotated rounds between CUDA events). TFLOP/s counts
the chunked form's multiply-adds per token and value head, ``2 (3 C dk + 2 C dv + 3 dk dv)`` forward, backward
twice that. Each candidate's output is checked against ``torch_chunked`` (fp32 rel error). One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from kernel_bench import add_common_args, check_device, documents, run, select

from mcore_ssm.gdn_reference import chunk_gated_delta_rule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--qk-heads", type=int, default=16)
    parser.add_argument("--v-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128, help="dk = dv")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.qk_heads, args.v_heads, args.head_dim = 1, 160, 1, 2, 16
        args.repeats, args.iters, args.warmup = 2, 1, 1
    if args.seq % args.docs or args.v_heads % args.qk_heads:
        parser.error("--docs must divide --seq and --qk-heads must divide --v-heads")
    check_device(parser, args)
    return args


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, t, hk, hv, d = args.batch, args.seq, args.qk_heads, args.v_heads, args.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    q = F.normalize(randn(b, t, hk, d), dim=-1).to(dtype)
    k = F.normalize(randn(b, t, hk, d), dim=-1).to(dtype)
    v = randn(b, t, hv, d).to(dtype)
    g = -F.softplus(randn(b, t, hv)) * 0.3  # fp32, as the block passes it
    beta = torch.sigmoid(randn(b, t, hv))
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "cu_seqlens": documents(args, device)}


def candidates(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    found: dict[str, Callable[..., torch.Tensor]] = {}
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from mcore_ssm.gdn_triton import gated_delta_rule_triton

        found["triton"] = lambda q, k, v, g, beta, cu_seqlens: gated_delta_rule_triton(
            q, k, v, g, beta, cu_seqlens=cu_seqlens
        )[0]

        def pinned(**chosen: str) -> Callable[..., torch.Tensor]:
            def triton_pinned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g, beta, cu_seqlens) -> torch.Tensor:  # type: ignore[no-untyped-def]
                before = {name: os.environ.get(name) for name in chosen}
                os.environ.update(chosen)  # read when the forward starts; its backward runs the same choices
                try:
                    return gated_delta_rule_triton(q, k, v, g, beta, cu_seqlens=cu_seqlens)[0]
                finally:
                    for name, value in before.items():
                        if value is None:
                            del os.environ[name]
                        else:
                            os.environ[name] = value

            return triton_pinned

        found["triton_v1"] = pinned(MCORE_SSM_GDN_FWD="v1")
        found["triton_v2"] = pinned(MCORE_SSM_GDN_FWD="v2")
        # the backward before 2026-12-07 (fp32 scratch, v1 reverse walk), and each candidate below pinned against it:
        # their names keep meaning what they measured then, whatever the defaults are now
        before = {"MCORE_SSM_GDN_BWD_SCRATCH": "fp32", "MCORE_SSM_GDN_STATE_BWD": "v1"}
        found["triton_bwd_before"] = pinned(**before)
        found["triton_state_bwd_v2"] = pinned(**{**before, "MCORE_SSM_GDN_STATE_BWD": "v2"})
        found["triton_pairs_t_saved"] = pinned(MCORE_SSM_GDN_PAIRS_T="saved")
        found["triton_bwd_opt_in"] = pinned(MCORE_SSM_GDN_STATE_BWD="v2", MCORE_SSM_GDN_PAIRS_T="saved")
        found["triton_inverse_blocks16"] = pinned(MCORE_SSM_GDN_INVERSE="blocks16")
        found["triton_inverse_blocks16_pairs_t_saved"] = pinned(
            MCORE_SSM_GDN_INVERSE="blocks16", MCORE_SSM_GDN_PAIRS_T="saved"
        )
        found["triton_bwd_scratch_inputs"] = pinned(**{**before, "MCORE_SSM_GDN_BWD_SCRATCH": "inputs"})
        found["triton_bwd_scratch_inputs_state_bwd_v2"] = pinned(  # = the default since 2026-12-07
            MCORE_SSM_GDN_BWD_SCRATCH="inputs", MCORE_SSM_GDN_STATE_BWD="v2"
        )
        found["triton_walk_blocks"] = pinned(**before, MCORE_SSM_GDN_WALK_ORDER="blocks")
        found["triton_bwd_scratch_inputs_walk_blocks"] = pinned(
            **{**before, "MCORE_SSM_GDN_BWD_SCRATCH": "inputs"}, MCORE_SSM_GDN_WALK_ORDER="blocks"
        )
        found["triton_walk_blocks_now"] = pinned(MCORE_SSM_GDN_WALK_ORDER="blocks")  # today's defaults + blocks
    found["torch_chunked"] = lambda q, k, v, g, beta, cu_seqlens: chunk_gated_delta_rule(
        q, k, v, g, beta, cu_seqlens=cu_seqlens
    )[0]
    compiled = torch.compile(chunk_gated_delta_rule)
    found["torch_chunked_compiled"] = lambda q, k, v, g, beta, cu_seqlens: compiled(
        q, k, v, g, beta, cu_seqlens=cu_seqlens
    )[0]
    if device.type == "cuda" and importlib.util.find_spec("fla") is not None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_rule

        def fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g, beta, cu_seqlens) -> torch.Tensor:  # type: ignore[no-untyped-def]
            b, t = v.shape[:2]
            flat = (lambda x: x.flatten(0, 1)[None]) if cu_seqlens is not None else (lambda x: x)
            out, _ = fla_rule(
                flat(q),
                flat(k),
                flat(v),
                flat(g),
                flat(beta),
                cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
            )
            return out.view(b, t, *out.shape[2:])

        found["fla"] = fla
    return select(args, found)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hv, d, chunk = args.v_heads, args.head_dim, 64
    fwd_flops = 2 * args.batch * args.seq * hv * (3 * chunk * d + 2 * chunk * d + 3 * d * d)
    group = max(1, args.v_heads // args.qk_heads)

    def adapt(name: str, given: dict[str, Any]) -> dict[str, Any]:
        if name == "fla":  # fla's own head layout: one q/k head per value head
            given["q"] = given["q"].repeat_interleave(group, dim=2)
            given["k"] = given["k"].repeat_interleave(group, dim=2)
        return given

    inputs = make_inputs(args, device, dtype)
    run(args, device, dtype, inputs, candidates(args, device), fwd_flops=fwd_flops, probe_like="v", adapt=adapt)


if __name__ == "__main__":
    main()
