"""Decode speed of the inference engine against a plain CUDA-graph loop and Hugging Face ``generate``.

Why it exists: issue 20's Speed section. For each preset (random weights, bf16) and batch size, ``prompt`` tokens
per request, ``output`` tokens generated (greedy, no stop), it reports decode milliseconds per step (the prefill
step excluded), decode tokens/s, and the percentage of the roofline: the weight bytes a decode step reads (every
parameter but an untied embedding table) over the copy bandwidth measured in the same run by a large
device-to-device copy (bytes read + written per second). Candidates:

* ``engine+graphs``: ``LLM(model, cuda_graphs=True)``, one graph at the batch size;
* ``engine+graphs+overlap``: the same with ``overlap_decode=True`` (each decode step launched before the one before
  it is read: ``overlap.py``);
* ``engine``: the same engine decoding eagerly (``cuda_graphs=False``);
* ``plain-graph``: a few dozen lines over the same weights: preallocated ``(B, L, nkv, hd)`` caches, torch SDPA,
  the whole step (argmax and position update included) captured as one CUDA graph;
* ``engine-replay-only``: the engine's captured graph alone, replayed (device time without host work);
* ``hf``: ``transformers`` ``LlamaForCausalLM.generate`` on the same weights (``--hf-presets``; it is slow).

With graphs, the rows of ``engine+graphs`` and ``+overlap`` carry ``tokens_equal``: the two run the same static
step, so their greedy tokens must agree (an engine replaying over stale weights would not).

Candidates run in rounds, rotated each round (``mcore_testing.bench``); a row gives median/min/max over rounds.
Output: JSON lines (stdout and ``--out``), then one Markdown table row per result for RESULTS.md. ``--quick``:
a CPU smoke run on the ``tiny`` preset in fp32 (no graphs).

    python plugins/mcore-inference/benchmarks/bench_decode.py --out decode.jsonl
    python plugins/mcore-inference/benchmarks/bench_decode.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams

from mcore_models.gpt import GPT
from mcore_models.kernels.rope import apply_rope
from mcore_models.presets import preset_config
from mcore_testing.bench import Timer, emit, run_header, timing_row, write_lines


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second of a ``mib`` MiB device-to-device copy, read plus written (the best of 5 timings)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    dst.copy_(src)
    ms = min(timer(lambda: dst.copy_(src), 10) for _ in range(5))
    return 2 * src.numel() / (ms / 1e3)


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: all of them but an untied embedding table (B rows looked up)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.head is not None:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineDecode:
    """Prefill ``prompts`` in one step, then time the decode steps of ``LLM``'s engine."""

    def __init__(self, model: Any, batch: int, prompt: int, output: int, graphs: bool, overlap: bool = False) -> None:
        total = prompt + output
        self.llm = LLM(
            model,
            num_blocks=batch * math.ceil(total / 16) + 1,
            max_num_seqs=batch,
            max_num_batched_tokens=max(batch * prompt, 256),
            max_model_len=total,
            enable_prefix_caching=False,
            cuda_graphs=graphs,
            graph_batch_sizes=(batch,),
            overlap_decode=overlap,
        )
        gen = torch.Generator().manual_seed(0)
        self.prompts = [
            torch.randint(0, model.config.vocab_size, (prompt,), generator=gen).tolist() for _ in range(batch)
        ]
        self.params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
        self.device = next(model.parameters()).device

    def __call__(self) -> float:
        engine = self.llm.engine
        ids = [engine.add_request(p, self.params) for p in self.prompts]
        done: dict[int, list[int]] = {}
        for out in engine.step():  # the prefill of every prompt: each request's first token
            if out.finished:
                done[out.request_id] = list(out.token_ids)
        sync(self.device)
        begin, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.token_ids)
            steps += 1
        sync(self.device)
        self.tokens = [done[i] for i in ids]  # greedy: every round gives the same tokens
        return (time.perf_counter() - begin) * 1e3 / steps


class ReplayOnly:
    """The engine's captured decode graph replayed ``steps`` times on the inputs of its last step: the device
    time of a step without the engine's host work (scheduling, buffer fills, sampling); a diagnostic."""

    def __init__(self, engine_run: EngineDecode, batch: int, steps: int) -> None:
        decoder = engine_run.llm.engine.decoder
        assert decoder is not None and batch in decoder.graphs
        self.graph, self.steps, self.device = decoder.graphs[batch][0], steps, engine_run.device

    def __call__(self) -> float:
        sync(self.device)
        begin = time.perf_counter()
        for _ in range(self.steps):
            self.graph.replay()
        sync(self.device)
        return (time.perf_counter() - begin) * 1e3 / self.steps


class PlainGraphDecode:
    """Static-KV decode over ``model``'s weights: ``(B, L, nkv, hd)`` caches, SDPA masked to the position, the
    step (argmax into the next tokens, position + 1 included) one CUDA graph on CUDA, eager on the CPU."""

    def __init__(self, model: Any, batch: int, prompt: int, output: int) -> None:
        self.model, self.batch, self.prompt, self.output = model, batch, prompt, output
        param = next(model.parameters())
        self.device, length = param.device, prompt + output
        first = model.layers[0].attention
        kv_heads = first.k.weight.shape[0] // first.head_dim
        shape = (batch, length, kv_heads, first.head_dim)
        gen = torch.Generator(device=self.device).manual_seed(0)  # a random "prefilled" prompt
        self.keys = [torch.randn(shape, generator=gen, device=self.device).to(param.dtype) for _ in model.layers]
        self.values = [torch.randn(shape, generator=gen, device=self.device).to(param.dtype) for _ in model.layers]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.slots = torch.arange(length, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.device.type == "cuda":
            self.pos.fill_(prompt)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.step()

    def step(self) -> None:
        model, batch = self.model, self.batch
        hidden = model.embed(self.tokens)[:, None]  # (B, 1, H)
        positions = self.pos.view(1, 1).expand(batch, 1)  # (B, 1)
        see = (self.slots <= self.pos).view(1, 1, 1, -1)  # (1, 1, 1, L)
        for layer, keys, values in zip(model.layers, self.keys, self.values):
            att = layer.attention
            x = layer.attn_norm(hidden)
            q = att.q_norm(F.linear(x, att.q.weight, att.q.bias).view(batch, 1, -1, att.head_dim))  # (B, 1, nh, hd)
            k = att.k_norm(F.linear(x, att.k.weight, att.k.bias).view(batch, 1, -1, att.head_dim))  # (B, 1, nkv, hd)
            v = F.linear(x, att.v.weight, att.v.bias).view(batch, 1, -1, att.head_dim)
            cos, sin = att.rotary(positions)
            q, k = apply_rope(q, k, cos, sin)
            keys.index_copy_(1, self.pos, k.to(keys.dtype))
            values.index_copy_(1, self.pos, v.to(values.dtype))
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=see,
                scale=att.scale,
                enable_gqa=True,
            )  # (B, nh, 1, hd)
            hidden = hidden + F.linear(out.transpose(1, 2).reshape(batch, 1, -1), att.out.weight, att.out.bias)
            x = layer.mlp_norm(hidden)
            mlp = layer.mlp
            hidden = hidden + F.linear(
                F.silu(F.linear(x, mlp.gate.weight)) * F.linear(x, mlp.up.weight), mlp.down.weight
            )
        logits = F.linear(model.final_norm(hidden)[:, 0], model.output_weight)  # (B, V)
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)

    @torch.no_grad()
    def __call__(self) -> float:
        self.pos.fill_(self.prompt)
        sync(self.device)
        begin = time.perf_counter()
        for _ in range(self.output - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        sync(self.device)
        return (time.perf_counter() - begin) * 1e3 / (self.output - 1)


class HFDecode:
    """``transformers`` Llama with ``model``'s config and weights: ``generate`` minus one prefill forward."""

    def __init__(self, model: Any, batch: int, prompt: int, output: int) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg, first = model.config, model.layers[0]
        att = first.attention
        param = next(model.parameters())
        rope: dict[str, Any] = {"rope_theta": float(getattr(att.config, "rope_theta", 10000.0))}  # 4.x and 5.x
        hf_cfg = LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=first.mlp.gate.weight.shape[0],
            num_hidden_layers=len(model.layers),
            num_attention_heads=att.q.weight.shape[0] // att.head_dim,
            num_key_value_heads=att.k.weight.shape[0] // att.head_dim,
            head_dim=att.head_dim,
            max_position_embeddings=prompt + output,
            **rope,
            rms_norm_eps=float(first.attn_norm.eps),
            tie_word_embeddings=model.head is None,
        )
        with torch.device(param.device):
            self.hf = LlamaForCausalLM(hf_cfg).to(param.dtype).eval()  # (any transformers version)
        with torch.no_grad():
            inner = self.hf.model
            inner.embed_tokens.weight.copy_(model.embed.weight)
            inner.norm.weight.copy_(model.final_norm.weight)
            if model.head is not None:
                self.hf.lm_head.weight.copy_(model.head.weight)
            for ours, theirs in zip(model.layers, inner.layers):
                pairs = [
                    (ours.attention.q, theirs.self_attn.q_proj),
                    (ours.attention.k, theirs.self_attn.k_proj),
                    (ours.attention.v, theirs.self_attn.v_proj),
                    (ours.attention.out, theirs.self_attn.o_proj),
                    (ours.mlp.gate, theirs.mlp.gate_proj),
                    (ours.mlp.up, theirs.mlp.up_proj),
                    (ours.mlp.down, theirs.mlp.down_proj),
                ]
                for a, b in pairs:
                    b.weight.copy_(a.weight)
                theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
                theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=gen).to(param.device)
        self.output, self.device = output, param.device

    @torch.no_grad()
    def __call__(self) -> float:
        sync(self.device)
        begin = time.perf_counter()
        self.hf(self.ids)  # the prefill alone, to subtract
        sync(self.device)
        prefill = time.perf_counter() - begin
        begin = time.perf_counter()
        self.hf.generate(
            self.ids, max_new_tokens=self.output, min_new_tokens=self.output, do_sample=False, pad_token_id=0
        )
        sync(self.device)
        return (time.perf_counter() - begin - prefill) * 1e3 / (self.output - 1)


def rounds(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call each, then ``repeats`` rounds in an order rotated each round: ms per step per round."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(candidates[name]())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["bench-0.9b", "llama3-8b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-presets", nargs="*", default=["bench-0.9b"], help="presets HF generate runs on")
    parser.add_argument("--hf-repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, fp32, short")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.presets, args.batches, args.prompt, args.output, args.repeats = ["tiny"], [1, 2], 8, 8, 1
        args.hf_presets = ["tiny"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs = device.type == "cuda"
    torch.manual_seed(0)
    lines: list[dict[str, Any]] = []
    bandwidth = copy_bandwidth(device, 4096 if device.type == "cuda" else 64)
    emit(lines, run_header(device, dtype, prompt=args.prompt, output=args.output, copy_gb_s=round(bandwidth / 1e9, 1)))
    table: list[str] = []
    for preset in args.presets:
        model = GPT.build(preset_config(preset), seed=0, device=device).to(dtype).eval()
        read = weight_bytes(model)
        roofline_ms = read / bandwidth * 1e3
        for batch in args.batches:
            candidates: dict[str, Callable[[], float]] = {}
            if graphs:
                with_graphs = EngineDecode(model, batch, args.prompt, args.output, graphs=True)
                candidates["engine+graphs"] = with_graphs
                candidates["engine+graphs+overlap"] = EngineDecode(
                    model, batch, args.prompt, args.output, graphs=True, overlap=True
                )
                with_graphs()  # the graph's buffers then hold a real step's inputs
                candidates["engine-replay-only"] = ReplayOnly(with_graphs, batch, args.output - 1)
            candidates["engine"] = EngineDecode(model, batch, args.prompt, args.output, graphs=False)
            candidates["plain-graph" if graphs else "plain"] = PlainGraphDecode(model, batch, args.prompt, args.output)
            times = rounds(candidates, args.repeats)
            # graphs with and without overlap run the same static step: their greedy tokens must be equal (a check
            # that the timed engines decode what they should: one reading stale weights would differ)
            same = None
            if graphs:
                same = with_graphs.tokens == candidates["engine+graphs+overlap"].tokens  # type: ignore[attr-defined]
                if not same:
                    print(f"WARNING {preset} batch {batch}: engine+graphs and +overlap gave different greedy tokens")
            if preset in args.hf_presets and importlib.util.find_spec("transformers") is not None:
                hf = HFDecode(model, batch, args.prompt, args.output)
                times["hf"] = rounds({"hf": hf}, args.hf_repeats)["hf"]
                del hf
            for name, ms in times.items():
                row = timing_row(ms)
                step_ms = row["median_ms"]
                result = {
                    "preset": preset,
                    "batch": batch,
                    "candidate": name,
                    **row,
                    "decode_tok_s": round(batch * 1e3 / step_ms, 1),
                    "roofline_pct": round(100 * roofline_ms / step_ms, 1),
                    "weight_gb": round(read / 1e9, 3),
                    "roofline_ms": round(roofline_ms, 4),
                }
                if same is not None and name.startswith("engine+graphs"):
                    result["tokens_equal"] = same
                emit(lines, result)
                table.append(
                    f"| {preset} | {batch} | {name} | {step_ms:.3f} | {result['decode_tok_s']:,.0f} | "
                    f"{result['roofline_pct']:.0f}% |"
                )
            del candidates
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
    write_lines(args.out, lines)
    print("| preset | batch | candidate | ms/step | decode tok/s | % roofline |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
