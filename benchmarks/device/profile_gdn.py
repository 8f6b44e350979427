"""Kernels of the GDN Triton forward and backward (bench_gdn's shape)."""

import torch
from torch.profiler import ProfilerActivity, profile

from mcore_ssm.gdn_triton import gated_delta_rule_triton

torch.manual_seed(0)
B, T, HK, HV, D = 8, 4096, 16, 32, 128
dev, dt = "cuda", torch.bfloat16
q = torch.nn.functional.normalize(torch.randn(B, T, HK, D, device=dev), dim=-1).to(dt)
k = torch.nn.functional.normalize(torch.randn(B, T, HK, D, device=dev), dim=-1).to(dt)
v = torch.randn(B, T, HV, D, device=dev, dtype=dt)
g = -torch.rand(B, T, HV, device=dev) * 0.1
beta = torch.rand(B, T, HV, device=dev).to(dt)
leaves = [t.requires_grad_() for t in (q, k, v, g, beta)]


def fwd():
    return gated_delta_rule_triton(q, k, v, g, beta)[0]


for _ in range(3):
    o = fwd()
    o.backward(torch.ones_like(o))
torch.cuda.synchronize()
for mode in ("fwd", "fwd+bwd"):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            o = fwd()
            if mode != "fwd":
                o.backward(torch.ones_like(o))
        torch.cuda.synchronize()
    print("==", mode, "(3 calls)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
