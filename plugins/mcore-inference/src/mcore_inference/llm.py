"""``LLM``: the offline API. Load a model, then ``generate`` a batch of prompts or ``stream`` one.

Why it exists: ``LLMEngine`` is step by step and takes a built model; most users have a checkpoint and prompts.
``LLM(path)`` loads an mcore checkpoint directory (or a run directory: its newest checkpoint) through the core's
``load_for_inference``, or a Hugging Face directory (``config.json``) through ``mcore.hf.load_hf`` and the
families the installed plugins register; an ``nn.Module`` is served as it is. The KV cache takes ``num_blocks``
blocks, or ``gpu_memory_fraction`` of the GPU's memory (less what is in use once the model is loaded); without
either, 90% on a GPU and room for 8 full-length sequences on the CPU. ``kv_cache_dtype="fp8_e4m3"`` stores keys
and values in FP8 with per-head scales (``kv_quant.py``): the same memory holds twice a bf16 cache's blocks.

Decode steps run as CUDA graphs (``static_decode.py``) when the model is on a GPU and its cache is one attention
group (``cuda_graphs=None``, the default; ``False`` turns them off, ``True`` insists and fails loudly). By
default a model whose decode step cannot be captured (a host sync inside) warns and decodes eagerly. Hybrid models
(recurrent layers beside the attention group) decode with static steps and graphs too (their graphs-vs-eager GPU
test passed on an H100, 2026-12-07, once a second engine no longer moved the first one's weights).

``speculative_tokens=k`` (``k >= 1``; 0, the default, is off) turns on MTP speculative decoding
(``speculative.py``): a model with MTP layers drafts up to ``k`` tokens per sequence and step, which the next
model call verifies; greedy output is the plain one. A model without MTP layers is refused. ``cuda_graphs=True``
captures its verification and draft steps (``static_speculative.py``); ``None`` means off with speculation until
those graphs' GPU tests have run on a card (written, not yet run: 2026-12-06).

``overlap_decode`` launches each CUDA-graph decode step before the host reads the step before it (``overlap.py``:
the host's work runs while the GPU computes; the same tokens). ``None`` (the default) turns it on wherever it
applies: graphs on, no speculation (H100, 2026-12-07, bench-0.9b: 1.228 -> 1.144 ms a step at batch 1, 1.623 -> 1.367
ms at batch 32; its GPU test passes); ``False`` keeps it off; ``True`` asks for it (refused with speculation).

``lockstep_group`` is ``LLMEngine``'s: a model sharded over ranks (``ep``) is built on every rank with the same
options and driven through ``lockstep.LockstepEngine`` (``mcore serve --ep``: ``server/ep_serve.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcore.errors import UserError
from mcore_inference.attention import fp8_decode_in_triton
from mcore_inference.engine import LLMEngine, RequestOutput, model_cache_specs
from mcore_inference.kv_quant import resolve_kv_cache_dtype
from mcore_inference.sampling import SamplingParams
from mcore_inference.speculative import mtp_layers
from mcore_inference.static_decode import static_decode_supported

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES |= {"float16": torch.float16, "fp16": torch.float16}

Prompt = str | Sequence[int]

#: Longest context for which a latent (MLA) cache gets CUDA graphs by default (its decode reads the padded table).
_LATENT_GRAPH_LEN = 8192


@dataclass
class CompletionOutput:
    """One prompt's result."""

    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise UserError(f"dtype = {value!r}: must be one of {', '.join(_DTYPES)} (or a torch.dtype)")
    return _DTYPES[value]


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)`` from an mcore checkpoint (or run) directory or a Hugging Face directory."""
    from mcore.plugins import load_plugins

    root = Path(path)
    if not root.exists():
        raise UserError(f"{str(path)!r}: no such checkpoint, run or Hugging Face directory")
    host = load_plugins()
    if (root / "config.json").is_file() and not (root / "meta.json").is_file():
        from mcore.hf import load_hf, model_file

        _, _, model = load_hf(root, host, device=device)
        tokenizer = None
        if (root / "tokenizer.json").is_file():
            from mcore.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model_file(root, "tokenizer.json"))  # a link out of the directory is refused
        return model.eval(), tokenizer
    from mcore.train.generate import load_for_inference, resolve_checkpoint

    model, tokenizer, _, _ = load_for_inference(resolve_checkpoint(str(path)), host)
    return model.to(device).eval(), tokenizer


class LLM:
    """Serve ``model`` (a path or a built ``nn.Module``) with the paged-cache engine; see the module docstring."""

    def __init__(
        self,
        model: str | Path | nn.Module,
        *,
        tokenizer: Any = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        gpu_memory_fraction: float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        dtype: torch.dtype | str | None = None,
        enable_prefix_caching: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        cuda_graphs: bool | None = None,
        graph_batch_sizes: Sequence[int] | None = None,
        kv_cache_dtype: str = "auto",
        speculative_tokens: int = 0,
        lockstep_group: Any = None,
        overlap_decode: bool | None = None,
    ) -> None:
        want = _dtype(dtype)
        fp8_kv = resolve_kv_cache_dtype(kv_cache_dtype) is not None  # a bad value fails before the model loads
        k = speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"LLM speculative_tokens = {k!r}: must be an int >= 0 (0: off)")
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        if isinstance(model, nn.Module):
            module, loaded_tokenizer = model, None
        else:
            module, loaded_tokenizer = load_model(model, dev)
            if want is None and dev.type == "cuda":
                want = torch.bfloat16  # served in bf16 unless asked otherwise
        if want is not None:
            module = module.to(want)
        module.eval()
        if k and not mtp_layers(module):
            raise UserError(
                f"LLM speculative_tokens = {k}: the model has no MTP layers (mtp_num_layers = 0, or no "
                "forward_with_hidden/mtp_forward); allowed: 0"
            )
        self.model = module
        self.tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        memory_bytes = None
        if num_blocks is not None and gpu_memory_fraction is not None:
            raise UserError("LLM: give num_blocks or gpu_memory_fraction, not both")
        if num_blocks is None:
            param = next(iter(module.parameters()))
            if param.device.type == "cuda":
                memory_bytes = _gpu_budget(0.9 if gpu_memory_fraction is None else gpu_memory_fraction, param.device)
            elif gpu_memory_fraction is not None:
                raise UserError("LLM gpu_memory_fraction needs the model on a CUDA device; give num_blocks on the CPU")
            else:
                declared = getattr(getattr(module, "config", None), "max_position_embeddings", None)
                longest = max_model_len or (declared if isinstance(declared, int) else 2048)
                num_blocks = -(-min(longest, 8192) // block_size) * min(max_num_seqs, 8)
        on_cuda = next(iter(module.parameters())).device.type == "cuda"
        declared_len = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        graphs = cuda_graphs
        if graphs is None:  # the default: on CUDA, for a cache of one attention group (hybrid too), a known length
            length = max_model_len if max_model_len is not None else declared_len
            specs = model_cache_specs(module)
            # a latent (MLA) cache, or an FP8 one unless its decode is opted into the Triton kernel, decodes with the
            # torch path, which reads the whole padded table: short ones only
            torch_fp8 = fp8_kv and not fp8_decode_in_triton()
            latent = torch_fp8 or any(getattr(spec, "value_dim", 0) is None for spec in specs.values())
            graphs = (
                not k
                and on_cuda
                and isinstance(length, int)
                and static_decode_supported(specs)
                and (not latent or length <= _LATENT_GRAPH_LEN)
            )

        def build(with_graphs: bool) -> LLMEngine:
            return LLMEngine(
                module,
                tokenizer=self.tokenizer,
                block_size=block_size,
                num_blocks=num_blocks,
                memory_bytes=memory_bytes,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                cuda_graphs=with_graphs,
                graph_batch_sizes=graph_batch_sizes,
                kv_cache_dtype=kv_cache_dtype,
                speculative_tokens=k,
                lockstep_group=lockstep_group,
                overlap_decode=with_graphs and (overlap_decode if overlap_decode is not None else k == 0),
            )

        try:
            self.engine = build(graphs)
        except RuntimeError as err:  # a decode step that cannot be captured (a host sync in the model)
            if cuda_graphs is not None or not graphs:
                raise
            warnings.warn(
                f"LLM: CUDA graph capture failed ({str(err).splitlines()[0]}); decoding eagerly "
                "(cuda_graphs=False skips the attempt)",
                stacklevel=2,
            )
            torch.cuda.synchronize()
            self.engine = build(False)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Complete every prompt (text needs a tokenizer, or token id lists), one ``SamplingParams`` for all or one
        per prompt; outputs in the prompts' order. A bad prompt raises before any runs."""
        batch = _as_batch(prompts)
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params] * len(batch)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(batch):
                raise UserError(f"{len(per_prompt)} SamplingParams for {len(batch)} prompts: give one, or one each")
        ids: list[int] = []
        try:
            for prompt, p in zip(batch, per_prompt):
                ids.append(self.engine.add_request(prompt, p))
        except UserError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        done: dict[int, RequestOutput] = {}
        wanted = set(ids)
        while wanted - done.keys():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
        return [_completion(done[i]) for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """The request's output after each step that adds to it (``new_token_ids``, ``new_text``); the last has
        ``finished``. Closing the iterator early aborts the request."""
        request_id = self.engine.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(request_id)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return [items]  # one prompt of token ids
    return items


def _completion(out: RequestOutput) -> CompletionOutput:
    return CompletionOutput(
        request_id=out.request_id,
        prompt_token_ids=out.prompt_token_ids,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=out.finish_reason,
        logprobs=out.logprobs,
        top_logprobs=out.top_logprobs,
    )


def _gpu_budget(fraction: float, device: torch.device) -> int:
    """Bytes for the KV cache: ``fraction`` of the GPU's memory less what is in use now (weights, other work)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise UserError(f"LLM gpu_memory_fraction = {fraction!r}: must be in (0, 1]")
    free, total = torch.cuda.mem_get_info(device)
    budget = int(fraction * total) - (total - free)
    if budget <= 0:
        raise UserError(
            f"LLM gpu_memory_fraction = {fraction}: {total - free} of {total} bytes are in use already; raise it"
        )
    return budget
