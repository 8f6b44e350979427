"""``mcore generate CHECKPOINT --prompt TEXT --max-new-tokens N``: sample text from a checkpoint.

The checkpoint's own resolved config rebuilds the model (on one process, layout ``single``)
and its tokenizer; decoding is greedy unless ``--temperature`` (> 0) or ``--top-k`` is given.
With an inference engine installed (kind ``engine``, e.g. mcore-inference's paged-KV engine) the
tokens come from it (``--engine auto``, the default, picks the installed one; ``--engine NAME``
names one); without one, or with ``--engine none``, each new token re-runs the model over the last
``train.seq_len`` tokens (no KV cache: a check of a trained model, not a server).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

from mcore.cli import run_with_user_errors
from mcore.errors import UserError


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    from mcore.checkpoint.store import latest_checkpoint

    path = Path(spec)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(f"{spec!r} is not a checkpoint (no meta.json) nor a run directory holding checkpoints")


def load_for_inference(path: Path, host: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, tokenizer, config, meta)`` from a checkpoint, on one process."""
    import torch

    from mcore.checkpoint.load import check_model_fits, check_stored_schema, stored_tokenizer
    from mcore.checkpoint.store import load_model_weights, read_meta
    from mcore.config import resolve_config
    from mcore.data.tokenizer import tokenizer_from_description
    from mcore.train.build import build_model, load_model_factory

    meta = read_meta(path)
    check_stored_schema(path, meta["config"])
    raw = copy.deepcopy(meta["config"])
    raw["parallel"] = {"layouts": ["single"]}
    config = resolve_config(raw, host)
    factory = load_model_factory(config)
    if (
        getattr(factory, "supports_meta_init", False) is True
    ):  # meta.json's sizes against the tensors, before allocating
        skeleton, _ = build_model(config, host, "meta", factory=factory)
        check_model_fits(path, skeleton)
    model, factory = build_model(config, host, "cuda" if torch.cuda.is_available() else "cpu", factory=factory)
    load_model_weights(path, model)
    model.eval()
    described = stored_tokenizer(path, meta)
    run_dir = path.parent.parent  # <run>/checkpoints/step_N: the run's tokenizer/, and nothing outside the run
    tokenizer = tokenizer_from_description(described, run_dir / "tokenizer", confined_to=run_dir)
    check_same_tokenizer(path, described, tokenizer)
    return model, tokenizer, config, meta


def check_same_tokenizer(path: Path, described: dict[str, Any], tokenizer: Any) -> None:
    """Refuse a tokenizer that is not the one the checkpoint was trained with (a replaced ``tokenizer.json``):
    its ids would index past the embedding, or mean other text."""
    for key, now in (("vocab_size", tokenizer.vocab_size), ("eos_id", tokenizer.eos_id)):
        saved = described.get(key)
        if saved is not None and saved != now:
            raise UserError(
                f"checkpoint {path} was trained with a tokenizer of {key} {saved}, but the run's tokenizer/ has "
                f"{key} {now} (tokenizer.json was replaced?); put back the run's tokenizer.json"
            )


def generate_ids(
    model: Any,
    prompt: list[int],
    *,
    max_new_tokens: int,
    context: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[int]:
    import torch

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-context:]], device=device)  # (1, T)
            logits = model(window)[0, -1].float().cpu()  # (V,)
            if temperature <= 0 and top_k <= 0:
                ids.append(int(logits.argmax()))
                continue
            logits = logits / max(temperature, 1e-5) if temperature > 0 else logits
            if top_k > 0:
                cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    return ids


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcore generate", description="generate text from a checkpoint")
    parser.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXXX) or a run directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (default: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--engine", default="auto", help="inference engine: 'auto' (the installed one, if any), 'none', or a name"
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be a positive int")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0 (0: greedy)")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: must be >= 0 (0: no top-k)")
    from mcore.plugins import load_plugins

    host = load_plugins()
    engine_cls = pick_engine(host, args.engine)
    path = resolve_checkpoint(args.checkpoint)
    model, tokenizer, config, _ = load_for_inference(path, host)
    prompt = [int(i) for i in tokenizer.encode(args.prompt)] or [tokenizer.eos_id]
    max_len = max(config.train.seq_len, len(prompt) + args.max_new_tokens)
    try:
        engine = (
            None if engine_cls is None else engine_cls.from_model(model, tokenizer=tokenizer, max_model_len=max_len)
        )
    except MemoryError:  # the engine's cache for max_len tokens
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens}: a cache for {max_len:,} tokens does not fit in memory; ask for "
            "fewer tokens"
        ) from None
    if engine is not None:
        (new_ids,) = engine.generate_ids(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    else:
        ids = generate_ids(
            model,
            prompt,
            max_new_tokens=args.max_new_tokens,
            context=config.train.seq_len,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        new_ids = ids[len(prompt) :]
    sys.stdout.write(args.prompt + tokenizer.decode(new_ids) + "\n")
    return 0


def pick_engine(host: Any, choice: str) -> Any:
    """The engine class ``--engine`` names: ``auto`` the installed one (the first by name), ``none`` ``None``."""
    if choice == "none":
        return None
    names = host.registry.names("engine")
    if choice == "auto":
        return host.load("engine", names[0]) if names else None
    return host.load("engine", choice)


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_generate, list(sys.argv[1:] if argv is None else argv))
