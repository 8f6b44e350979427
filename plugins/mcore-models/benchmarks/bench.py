"""H100 benchmarks of mcore-models: kernels vs eager and compiled references, and a full training step.

Usage (on the GPU machine): ``python bench.py --out DIR [--sections mm,kernels,attention,step_eager,...]``.
Every timing is the median of many runs after warm-up (CUDA events via ``triton.testing.do_bench``),
on random inputs. Results go to ``DIR/bench.json`` and a markdown table to stdout.

Training-step precision scheme (ours and the plain-PyTorch baseline alike): fp32 parameters (the
master weights), forward and backward under ``torch.autocast(bfloat16)``, gradients in fp32,
``clip_grad_norm_(1.0)``, fused AdamW in fp32 (lr 1e-4, weight decay 0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from triton.testing import do_bench

RESULTS: dict[str, object] = {}
PEAK_BF16 = 989e12


def median_ms(fn, warmup=25, rep=200) -> float:  # type: ignore[no-untyped-def]
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


OUT_DIR = Path(".")


def record(key: str, value: object) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)
    (OUT_DIR / "bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))


# -- 1. matmul ceiling -----------------------------------------------------------------------
def bench_mm() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), rep=500)
    record("mm_8192_bf16_tflops", 2 * 8192**3 / ms / 1e9)


# -- 2. kernels ------------------------------------------------------------------------------
def fwd_bwd(fn, inputs, grads):  # type: ignore[no-untyped-def]
    def run() -> None:
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads)
        for x in inputs:
            x.grad = None

    return run


def compare(name: str, ours, reference, inputs, grads, nbytes: int | None = None, flops: int | None = None) -> None:  # type: ignore[no-untyped-def]
    compiled = torch.compile(reference)
    row: dict[str, float] = {}
    for label, fn in (("ours", ours), ("eager", reference), ("compiled", compiled)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[f"{label}_ms"] = median_ms(fwd_bwd(fn, inputs, grads))
        row[f"{label}_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if nbytes:
            row[f"{label}_GBps"] = nbytes / row[f"{label}_ms"] / 1e6
        if flops:
            row[f"{label}_TFLOPs"] = flops / row[f"{label}_ms"] / 1e9
    row["speedup_vs_eager"] = row["eager_ms"] / row["ours_ms"]
    row["speedup_vs_compiled"] = row["compiled_ms"] / row["ours_ms"]
    record(f"kernel_{name}", row)


def bench_kernels() -> None:
    from mcore_models.kernels.linear_ce import linear_cross_entropy_sum
    from mcore_models.kernels.rmsnorm import rms_norm_reference
    from mcore_models.kernels.rmsnorm_triton import rms_norm
    from mcore_models.kernels.rope import apply_rope_reference
    from mcore_models.kernels.rope_triton import apply_rope
    from mcore_models.kernels.swiglu import swiglu_reference
    from mcore_models.kernels.swiglu_triton import swiglu

    bf16 = torch.bfloat16
    tokens, hidden, ffn, vocab = 8192, 2048, 5632, 32768

    def leaf(*shape, dtype=bf16, scale=1.0):  # type: ignore[no-untyped-def]
        return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype).requires_grad_()

    # RMSNorm, bf16 activations, fp32... bf16 weight; bytes: fwd x,y; bwd x,dy,dx
    x, w = leaf(tokens, hidden), leaf(hidden)
    dy = torch.randn(tokens, hidden, device="cuda", dtype=bf16)
    compare(
        "rmsnorm_bf16",
        lambda a, b: rms_norm(a, b, 1e-5),
        lambda a, b: rms_norm_reference(a, b, 1e-5),
        [x, w],
        (dy,),
        nbytes=5 * tokens * hidden * 2,
    )

    # RoPE on Q and K of bench-0.9b (B=2, T=4096, 16 q heads, 8 kv heads, hd 128)
    q, k = leaf(2, 4096, 16, 128), leaf(2, 4096, 8, 128)
    angles = torch.arange(4096, device="cuda")[None, :, None] * torch.rand(64, device="cuda")
    cos, sin = angles.cos().expand(2, 4096, 64).contiguous(), angles.sin().expand(2, 4096, 64).contiguous()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qk_bytes = (q.numel() + k.numel()) * 2
    compare(
        "rope_bf16",
        lambda a, b: apply_rope(a, b, cos, sin),
        lambda a, b: apply_rope_reference(a, b, cos, sin),
        [q, k],
        (dq, dk),
        nbytes=4 * qk_bytes,
    )

    # SwiGLU activation on the separate gate and up projections; bytes: fwd gate,up,y; bwd gate,up,dy,dgate,dup
    gate, up = leaf(tokens, ffn), leaf(tokens, ffn)
    dy = torch.randn(tokens, ffn, device="cuda", dtype=bf16)
    compare("swiglu_bf16", swiglu, swiglu_reference, [gate, up], (dy,), nbytes=8 * tokens * ffn * 2)

    # Fused linear cross-entropy vs full logits + F.cross_entropy
    h, wt = leaf(tokens, hidden), leaf(vocab, hidden, scale=0.02)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")

    def ref_ce(a, b):  # type: ignore[no-untyped-def]
        return F.cross_entropy((a @ b.t()).float(), labels, reduction="sum")

    g = torch.tensor(1.0, device="cuda")
    for chunk in (4096, 8192):
        compare(
            f"linear_cross_entropy_bf16_chunk{chunk}",
            lambda a, b, chunk=chunk: linear_cross_entropy_sum(a, b, labels, chunk_size=chunk),
            ref_ce,
            [h, wt],
            (g,),
            flops=6 * tokens * hidden * vocab,
        )


# -- 3. attention backends -------------------------------------------------------------------
def bench_attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    flops = 3.5 * 4 * 2 * 16 * 128 * 4096 * 4097 / 2  # fwd 2 GEMMs + bwd 5 GEMMs (=2.5x fwd), causal
    row = {}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        for gqa in ("enable_gqa", "expand_kv"):

            def run(backend=backend, gqa=gqa):  # type: ignore[no-untyped-def]
                with sdpa_kernel([backend]):
                    if gqa == "enable_gqa":
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    else:
                        out = F.scaled_dot_product_attention(
                            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
                        )
                out.backward(do)
                q.grad = k.grad = v.grad = None

            try:
                ms = median_ms(run, rep=100)
                row[f"{name}_{gqa}_ms"] = ms
                row[f"{name}_{gqa}_TFLOPs"] = flops / ms / 1e9
            except Exception as exc:  # a backend may not take these inputs
                row[f"{name}_{gqa}"] = f"unsupported: {type(exc).__name__}"
    record("attention_fwd_bwd_B2_T4096_gqa16_8", row)


# -- 4. training step ------------------------------------------------------------------------
class PlainGPT(nn.Module):
    """The baseline: bench-0.9b in plain PyTorch ops (same math as ours; SDPA; unfused loss)."""

    def __init__(self, vocab=32768, hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, eps=1e-5, theta=10000.0):  # type: ignore[no-untyped-def]
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.eps = heads, kv_heads, hidden // heads, eps
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.n1, layer.n2 = nn.Parameter(torch.ones(hidden)), nn.Parameter(torch.ones(hidden))
            layer.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.hd, bias=False)
            layer.o = nn.Linear(heads * self.hd, hidden, bias=False)
            layer.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
            layer.down = nn.Linear(ffn, hidden, bias=False)
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.ones(hidden))
        self.head = nn.Linear(hidden, vocab, bias=False)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, x, cos, sin):  # type: ignore[no-untyped-def]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, tokens, labels):  # type: ignore[no-untyped-def]
        B, T = tokens.shape
        freqs = torch.arange(T, device=tokens.device).float()[:, None] * self.inv_freq  # (T, hd/2)
        cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]
        h = self.embed(tokens)
        for layer in self.layers:
            x = F.rms_norm(h, (h.shape[-1],), layer.n1, self.eps)
            q, k, v = layer.qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = self.rope(q.view(B, T, self.heads, self.hd).transpose(1, 2), cos, sin)
            k = self.rope(k.view(B, T, self.kv_heads, self.hd).transpose(1, 2), cos, sin)
            v = v.view(B, T, self.kv_heads, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            h = h + layer.o(a.transpose(1, 2).reshape(B, T, -1))
            x = F.rms_norm(h, (h.shape[-1],), layer.n2, self.eps)
            g, u = layer.gate_up(x).chunk(2, -1)
            h = h + layer.down(F.silu(g) * u)
        logits = self.head(F.rms_norm(h, (h.shape[-1],), self.norm, self.eps))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def step_fn(model, batch: int, seq: int):  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    tokens = torch.randint(0, 32768, (batch, seq), device="cuda")
    labels = torch.randint(0, 32768, (batch, seq), device="cuda")
    is_ours = hasattr(model, "output_weight") or hasattr(getattr(model, "_orig_mod", None), "output_weight")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=labels) if is_ours else model(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_step(step, iters=10, warmup=3) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def bench_step(variants: list[str]) -> None:
    from mcore_models.gpt import GPT
    from mcore_models.presets import preset_config

    cfg = preset_config("bench-0.9b")
    batch, seq = 2, 4096
    fpt = GPT.flops_per_token(cfg, seq)
    ceiling = RESULTS.get("mm_8192_bf16_tflops")
    record("flops_per_token_bench_0.9b_seq4096", fpt)
    for variant in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.time()
            if variant == "ours_compiled_reference":  # our model code, torch references instead of Triton
                use_reference_kernels()
            if variant.startswith("ours"):
                model = GPT.build(cfg, seed=0, device="cuda")
            else:
                torch.manual_seed(0)
                model = PlainGPT().cuda()
            if variant.endswith("compiled"):
                model = torch.compile(model)
            ms = time_step(step_fn(model, batch, seq))
            tps = batch * seq / ms * 1e3
            tflops = fpt * tps / 1e12
            row = {
                "step_ms": ms,
                "tokens_per_s": tps,
                "TFLOPs": tflops,
                "MFU_vs_989": tflops / 989,
                "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
                "setup_and_timing_s": time.time() - t0,
            }
            if ceiling:
                row["MFU_vs_measured_mm"] = tflops / ceiling
            record(f"step_{variant}", row)
        except Exception as exc:
            traceback.print_exc()
            record(f"step_{variant}", f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            model = None
            torch.cuda.empty_cache()


def use_reference_kernels() -> None:
    from mcore_models.kernels import linear_ce, rmsnorm, rope, swiglu

    os.environ["MCORE_MODELS_KERNELS"] = "reference"
    for fn in (rmsnorm.rms_norm, rope.apply_rope, swiglu.swiglu, linear_ce.ce_chunk):
        fn._by_device.clear()


def bench_profile() -> None:
    from torch.profiler import ProfilerActivity, profile

    from mcore_models.gpt import GPT
    from mcore_models.presets import preset_config

    model = GPT.build(preset_config("bench-0.9b"), seed=0, device="cuda")
    step = step_fn(model, 2, 4096)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
    (OUT_DIR / "profile_ours_eager.txt").write_text(table)
    print(table)
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:15]
    record("profile_ours_eager_top_ms_per_step", {e.key[:90]: round(e.device_time_total / 2e3, 2) for e in events})


def bench_maxbatch() -> None:
    from mcore_models.gpt import GPT
    from mcore_models.presets import preset_config

    cfg = preset_config("bench-0.9b")
    model = GPT.build(cfg, seed=0, device="cuda")
    fits = {}
    for batch in (4, 8, 12, 16):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            step = step_fn(model, batch, 4096)
            step()
            torch.cuda.synchronize()
            fits[batch] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError:
            fits[batch] = "OOM"
            break
    record("ours_eager_microbatch_peak_GiB_seq4096", fits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default="mm,kernels,attention,step_eager,profile,maxbatch,step_compiled")
    args = parser.parse_args()
    global OUT_DIR
    OUT_DIR = Path(args.out)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    record("device", torch.cuda.get_device_name())
    record("torch", torch.__version__)
    record("date_utc", time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    sections = args.sections.split(",")
    table = {
        "mm": bench_mm,
        "kernels": bench_kernels,
        "attention": bench_attention,
        "step_eager": lambda: bench_step(["plain_eager", "ours_eager"]),
        "step_compiled": lambda: bench_step(["plain_compiled", "ours_compiled", "ours_compiled_reference"]),
        "step_ours_compiled": lambda: bench_step(["ours_compiled"]),  # issue 14's target for `mcore train`
        "profile": bench_profile,
        "maxbatch": bench_maxbatch,
    }
    for name in sections:
        try:
            table[name]()
        except Exception as exc:
            traceback.print_exc()
            record(f"section_{name}", f"failed: {type(exc).__name__}: {exc}")
    print(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
