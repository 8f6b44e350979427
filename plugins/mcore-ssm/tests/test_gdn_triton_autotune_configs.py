"""Every autotuning config of the GDN kernels that CUDA autotunes, run in Triton's CPU interpreter with the bounds
checker (``mcore_testing.interpreter_bounds``) at the GPU tests' head dims (dk = dv = 128), fp16 inputs, with the
backward opt-ins ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``, ``MCORE_SSM_GDN_WALK_ORDER=blocks``,
``MCORE_SSM_GDN_STATE_BWD=v2`` and ``MCORE_SSM_GDN_PAIRS_T=saved`` and without them.

Why it exists: the other interpreter tests launch these kernels with one fixed config each (``gdn_triton._interpreted``
picks it: the autotuner would time on a GPU), mostly at small head dims, so the value-block widths that only the
autotuner tries on a card (the forward walk's 64 columns and the reverse walk's 16 at dk 128, the output kernel's 128)
and the CUDA launch code (grids from each config's meta) were never bounds-checked. Here the CUDA launch path runs
under the interpreter with each kernel's config list cut to one config at a time (one config: the autotuner launches
it without timing). Warps and stages do not change what the interpreter computes; the block sizes and grids do.

The configs of each kernel are cycled together (run ``i`` takes config ``i`` modulo each kernel's count), so four
forward + backward runs per option set cover every config; each run's output, final state and gradients are checked
against the fp64 recurrence."""

from __future__ import annotations

import pytest
from ssm_cases import run_interpreted

# B 1 x T 200 packed as documents of 1, 129 and 70 tokens (chunks of 1 | 64, 64, 1 | 64, 6), one q/k head and two
# value heads, initial and final states; the opt-ins on (16-bit scratch, blocks order, v2 reverse walk, saved T) and
# off but for the v2 reverse walk (fp32 scratch: the autotuner's other dtype key)
INTERPRETED = """
import os, torch, torch.nn.functional as F
import mcore_ssm.gdn_triton as gdn
import mcore_ssm.gdn_triton_state_v2 as walk
import mcore_ssm.gdn_triton_state_bwd_v2 as reverse
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
from ssm_cases import rel

for module in (gdn, walk, reverse):
    module._interpreted = lambda: False  # the CUDA launch path: autotuned kernels, grids from the config's meta
TUNED = {"output": gdn._chunk_output_tuned, "walk": walk._state_v2_tuned, "reverse": reverse._state_bwd_v2_tuned}
CONFIGS = {name: list(tuned.configs) for name, tuned in TUNED.items()}
NAMES = ("MCORE_SSM_GDN_BWD_SCRATCH", "MCORE_SSM_GDN_WALK_ORDER", "MCORE_SSM_GDN_STATE_BWD", "MCORE_SSM_GDN_PAIRS_T")
ENVS = (
    {"MCORE_SSM_GDN_BWD_SCRATCH": "inputs", "MCORE_SSM_GDN_WALK_ORDER": "blocks", "MCORE_SSM_GDN_STATE_BWD": "v2",
     "MCORE_SSM_GDN_PAIRS_T": "saved"},
    {"MCORE_SSM_GDN_BWD_SCRATCH": "fp32", "MCORE_SSM_GDN_STATE_BWD": "v2"},
)
gen = torch.Generator().manual_seed(0)
B, T, hk, hv, d = 1, 200, 1, 2, 128
q = F.normalize(torch.randn(B, T, hk, d, generator=gen), dim=-1).half()
k = F.normalize(torch.randn(B, T, hk, d, generator=gen), dim=-1).half()
v = torch.randn(B, T, hv, d, generator=gen).half()
gate = -F.softplus(torch.randn(B, T, hv, generator=gen) * 2)
beta = torch.sigmoid(torch.randn(B, T, hv, generator=gen))
h0 = torch.randn(3, hv, d, d, generator=gen) * 0.1
cu = torch.tensor([0, 1, 130, 200], dtype=torch.int32)
probe = torch.randn(B, T, hv, d, generator=gen).double()
probe_s = torch.randn(3, hv, d, d, generator=gen).double()
args = [t.requires_grad_() for t in (q, k, v, gate, beta, h0)]
exact = [t.detach().double().requires_grad_() for t in args]
ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5], cu_seqlens=cu, output_final_state=True)
want = [ref, ref_final, *torch.autograd.grad((ref * probe).sum() + (ref_final * probe_s).sum(), exact)]

errors, ran = [], {name: set() for name in TUNED}
for i in range(max(len(c) for c in CONFIGS.values())):
    for name, tuned in TUNED.items():
        tuned.configs = [CONFIGS[name][i % len(CONFIGS[name])]]
    for env in ENVS:
        os.environ.update(env)
        out, final = gdn.gated_delta_rule_triton(*args[:5], initial_state=args[5], cu_seqlens=cu,
                                                 output_final_state=True)
        for key in NAMES:
            os.environ.pop(key, None)  # the backward runs what the forward chose
        loss = (out.double() * probe).sum() + (final.double() * probe_s).sum()
        got = [out, final, *torch.autograd.grad(loss, args)]
        errors += [rel(a, b) for a, b in zip(got, want)]
        for name, tuned in TUNED.items():
            ran[name].add(CONFIGS[name].index(tuned.best_config))
print(*errors)
print(*[float(len(ran[name]) == len(CONFIGS[name])) for name in TUNED])
"""


@pytest.mark.slow
def test_every_autotune_config_in_bounds_at_gpu_head_dims() -> None:
    """dk = dv = 128, fp16, packed documents with partial chunks, initial and final states: every config of the
    output kernel, the v2 forward walk (both launch orders, 16-bit and fp32 scratch) and the v2 reverse walk (16-bit
    and fp32 scratch) runs with every masked load and store inside its tensors (the checker raises otherwise), and
    the output, final state and every gradient are within 1e-2 of the fp64 recurrence's."""
    runs = 4 * 2  # the reverse walk's four configs, two option sets
    numbers = run_interpreted(INTERPRETED, runs * 8 + 3, timeout=600)
    errors, covered = numbers[:-3], numbers[-3:]
    assert all(e < 1e-2 for e in errors), errors
    assert covered == [1.0, 1.0, 1.0], covered  # every config of every tuned kernel ran
