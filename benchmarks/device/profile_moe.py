"""Where the MoE layer's fwd+bwd goes: kernels, and the stacks of the copies (bench_moe's shape)."""

import sys
import traceback
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, "plugins/mcore-moe/benchmarks")
import bench_moe
from torch.profiler import ProfilerActivity, profile

from mcore.protocols import AuxLosses, BlockContext

args = bench_moe.parse_args([])
dev = torch.device("cuda")
dtype = torch.bfloat16
block = bench_moe._block(args, dev, dtype, None)
x = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dtype)
g = torch.randn_like(x)


def step():
    for p in block.parameters():
        p.grad = None
    inp = x.detach().requires_grad_()
    out = block(inp, BlockContext(aux_losses=AuxLosses()))
    out.backward(g)


for _ in range(3):
    step()
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record()
    step()
    e.record()
    e.synchronize()
    ts.append(s.elapsed_time(e))
print("fwd+bwd ms (grads set to None):", sorted(ts))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
print(
    prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=50
    )
)


COPY_OPS = {
    torch.ops.aten.copy_.default,
    torch.ops.aten.cat.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.add_.Tensor,
    torch.ops.aten.zeros.default,
    torch.ops.aten.index_select.default,
    torch.ops.aten.fill_.Scalar,
    torch.ops.aten.new_zeros.default,
}
seen = defaultdict(lambda: [0, 0])


class Trace(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPY_OPS and isinstance(out, torch.Tensor) and out.numel() * out.element_size() >= 1 << 20:
            frames = [
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[:-1]
                if "mcore" in f.filename or "bench_moe" in f.filename or "kp_moe" in f.filename
            ][-3:]
            node = torch._C._current_autograd_node()
            key = (
                str(func),
                tuple(out.shape),
                out.dtype,
                (node.name() if node is not None else "fwd") + " | " + " <- ".join(reversed(frames)),
            )
            seen[key][0] += 1
            seen[key][1] += out.numel() * out.element_size()
        return out


with Trace():
    step()
torch.cuda.synchronize()
for (fn, shape, dt, where), (n, b) in sorted(seen.items(), key=lambda kv: -kv[1][1]):
    print(f"{fn} {shape} {dt} x{n} {b / 2**20:.0f} MiB  {where}")
