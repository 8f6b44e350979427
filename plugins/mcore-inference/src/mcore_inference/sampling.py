"""Sampling: turn a step's logits into one token per sequence, batched on the logits' device.

The engine keeps one ``SamplingState`` per request (its ``SamplingParams``, prompt and output token ids) and calls
``Sampler.sample(logits, states)`` once per step. The pipeline for each row, in this order:

0. logits processors that change the argmax, as vLLM's v1 sampler orders them (``vllm/v1/sample/sampler.py``: min
   tokens, then logit bias, then penalties): ``min_tokens`` (while a request has fewer output tokens than it, the
   logits of its ``stop_token_ids`` and of the end-of-document token, unless ``ignore_eos``, are -inf) and
   ``logit_bias`` (each listed token's bias added to its logit); both as one ``index_put_`` over the step's
   (row, token) pairs, uploaded once;
1. penalties, as vLLM and OpenAI define them: repetition (over prompt and output tokens: positive logits divided by
   the penalty, negative ones multiplied), then frequency (times each token's output count) and presence (once for
   every token that appeared in the output) subtracted;
2. greedy rows (temperature 0, or below ``GREEDY_BELOW``) take the exact ``argmax`` of the biased, penalised logits;
3. the other rows divide by their temperature, then keep top-k (ties with the k-th logit kept), then top-p over the
   renormalised top-k distribution (the smallest head of the sorted distribution whose mass reaches ``top_p``; the
   most likely token is always kept), then min-p (tokens whose probability is at least ``min_p`` times the largest);
4. the draw is a Gumbel-max (``argmax(logit - log(E))``, ``E ~ Exp(1)``). A request with a ``seed`` takes its
   uniforms from an integer hash of (seed, position, vocabulary index), so its tokens depend only on the seed and
   the positions: not on the batch it shares, its row, preemption or CUDA graphs. Requests without a seed draw from
   the sampler's generator.

Logprobs (``SampleOutput.logprob`` and the top-n) are of the distribution after the logit bias, the min-tokens mask,
penalties and temperature (greedy rows: temperature 1), before top-k/top-p/min-p truncation, so a truncated token
still has a finite logprob (a masked stop token's is -inf). vLLM's default ("raw") is before all of these; ours is
the distribution the draw starts from.

Nothing here reads a device value on the host: the decisions (which rows are greedy, penalised, biased, seeded)
come from the host-side parameters, and per-row parameters travel in small pinned, non-blocking copies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch

from mcore.errors import UserError
from mcore_inference.grad import no_grad

#: Temperatures below this are greedy (dividing by them overflows the logits).
GREEDY_BELOW = 1e-5
#: The most top logprobs a request may ask for.
MAX_LOGPROBS = 20
#: The most ``logit_bias`` entries of one request. OpenAI's API takes at most 300 (its limit, as its users report it,
#: e.g. https://github.com/dottxt-ai/outlines/issues/99: "OpenAI currently only allows to send 300 values via the
#: logit_bias parameters"); we keep the same bound.
MAX_LOGIT_BIAS = 300
#: A ``logit_bias`` value's range, as OpenAI's: -100 effectively bans a token, 100 forces it.
LOGIT_BIAS_RANGE = 100.0
#: The most stop strings of one request, and the longest one (characters). OpenAI takes at most 4; vLLM has no bound,
#: but every generated token is checked against every stop string (and the text held back for a partial match grows
#: with the longest), so without a bound one request's list stalls everyone's decode.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
#: The most ``stop_token_ids`` of one request (a set lookup per token: cheap, but the list travels with the request).
MAX_STOP_TOKEN_IDS = 1024

_M32 = 0xFFFFFFFF


def _fail(name: str, value: Any, allowed: str) -> UserError:
    shown = repr(value)
    if len(shown) > 200:  # a huge bad value (a list of 10^5 stop strings) is named, not echoed whole
        shown = f"{shown[:120]}... ({type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'})"
    return UserError(f"SamplingParams.{name} = {shown}: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(name, value, "must be a finite number")
    return float(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops. Invalid values raise a one-line ``UserError``."""

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1: off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest head of the distribution with this mass, in (0, 1]."""
    min_p: float = 0.0
    """Keep tokens at least this fraction as likely as the most likely one, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 0; > 1 discourages tokens of the prompt and the output (positive logits divided, negative multiplied)."""
    presence_penalty: float = 0.0
    """In [-2, 2]; subtracted once from every token that appeared in the output."""
    frequency_penalty: float = 0.0
    """In [-2, 2]; subtracted once per appearance of a token in the output."""
    seed: int | None = None
    """Per-request seed (taken mod 2**64): the draws depend only on (seed, position). None: the engine's generator."""
    stop: tuple[str, ...] = ()
    """Stop strings: the output ends before the first one (kept with ``include_stop_str_in_output``)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the output (the token is in the output ids, its text is not)."""
    ignore_eos: bool = False
    """Keep generating after the tokenizer's end-of-document token."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many top logprobs (0: the chosen token's only), at most 20."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the output in its text."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (from the first on; of the model's raw distribution) and this many top
    logprobs per prompt position (0: the prompt token's only), at most 20. Such a request skips the prefix cache."""
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] | None = None
    """Added to the listed tokens' logits before sampling: ``{token id: bias}``, biases in [-100, 100], at most 300
    entries (OpenAI's ``logit_bias``). Kept as a tuple of ``(id, bias)`` pairs sorted by id (None when empty), so the
    params stay frozen and hashable. Ids at or above the model's vocabulary are refused when the request is added."""
    min_tokens: int = 0
    """No stop token (``stop_token_ids``, or the end-of-document token unless ``ignore_eos``) is sampled, and no stop
    string is honoured, before this many output tokens (vLLM's ``min_tokens``); <= ``max_tokens``."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _fail("max_tokens", self.max_tokens, "must be an integer >= 1")
        if _real("temperature", self.temperature) < 0:
            raise _fail("temperature", self.temperature, "must be >= 0 (0 is greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", self.top_k, "must be an integer >= 1, or 0 or -1 for no top-k")
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise _fail("top_p", self.top_p, "must be in (0, 1] (1 keeps every token)")
        if not 0 <= _real("min_p", self.min_p) <= 1:
            raise _fail("min_p", self.min_p, "must be in [0, 1] (0 keeps every token)")
        if _real("repetition_penalty", self.repetition_penalty) <= 0:
            raise _fail("repetition_penalty", self.repetition_penalty, "must be > 0 (1 is no penalty)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= _real(name, getattr(self, name)) <= 2:
                raise _fail(name, getattr(self, name), "must be in [-2, 2] (0 is no penalty)")
        if self.seed is not None and not _is_int(self.seed):
            raise _fail("seed", self.seed, "must be an integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _fail("stop", self.stop, "must be a string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise _fail(
                "stop", self.stop, f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters each"
            )
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise _fail("stop_token_ids", ids, "must be a list of token ids (integers >= 0)")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise _fail("stop_token_ids", ids, f"at most {MAX_STOP_TOKEN_IDS} token ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "must be true or false")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _fail("logprobs", self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise _fail("prompt_logprobs", self.prompt_logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _fail("min_tokens", self.min_tokens, f"must be an integer in [0, max_tokens = {self.max_tokens}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as stored: ``(id, bias)`` pairs sorted by id (empty: no bias)."""
        return cast("tuple[tuple[int, float], ...]", self.logit_bias or ())

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...] | None:
    """``logit_bias`` (a mapping, or ``(id, bias)`` pairs) as pairs sorted by id; None when empty. A bad entry is
    named on its own (the whole map may hold 300)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise _fail("logit_bias", value, "must be a mapping {token id: bias} or None")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise UserError(f"SamplingParams.logit_bias has {len(pairs)} entries: at most {MAX_LOGIT_BIAS} are allowed")
    out: dict[int, float] = {}
    for token, bias in pairs:
        if not _is_int(token) or token < 0 or token in out:
            raise _fail("logit_bias", f"{{{token!r}: ...}}", "each key must be a distinct token id (an integer >= 0)")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
            raise _fail(f"logit_bias[{token}]", bias, "must be a finite number in [-100, 100]")
        if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
            raise _fail(f"logit_bias[{token}]", bias, "must be in [-100, 100] (-100 bans the token, 100 forces it)")
        out[token] = float(bias)
    return tuple(sorted(out.items())) or None


def token_stop(params: SamplingParams, token_id: int, num_output: int, eos_id: int | None) -> tuple[str, int] | None:
    """Whether ``token_id`` (the ``num_output``-th output token) ends the request: ("stop", id), ("length", id) or None.

    A stop token (``stop_token_ids``, or ``eos_id`` unless ``ignore_eos``) wins over the length limit; it ends the
    request only after ``min_tokens`` output tokens (the sampler masks it before, so it is token
    ``min_tokens + 1`` at the earliest).
    """
    stops = num_output > params.min_tokens
    if stops and (token_id in params.stop_token_ids or (token_id == eos_id and not params.ignore_eos)):
        return "stop", token_id
    if num_output >= params.max_tokens:
        return "length", token_id
    return None


@dataclass(eq=False)
class SamplingState:
    """One request's sampling state, kept by the engine for the request's life (preemption included).

    The engine appends each chosen token to ``output_token_ids`` (and may truncate it, e.g. after rejected speculative
    tokens; it never rewrites tokens in place). Penalised requests keep on the device, lazily, a count of each output
    token and a mask of the prompt's tokens, brought up to date at each ``sample`` from the tokens added since.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    _counts: torch.Tensor | None = field(default=None, init=False, repr=False)  # (V,) int32: output count per token
    _counted: int = field(default=0, init=False, repr=False)  # output tokens already in _counts
    _prompt_mask: torch.Tensor | None = field(default=None, init=False, repr=False)  # (V,) bool: token is in the prompt

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: the position of the next token to sample."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class TopLogprobs(NamedTuple):
    ids: torch.Tensor  # (S, n) int64, most likely first
    values: torch.Tensor  # (S, n) float32


class SampleOutput(NamedTuple):
    token_ids: torch.Tensor  # (S,) int64 on the logits' device
    # (S,) float32: logprob of each chosen token (see the module docstring); None: not asked (sample(logprobs=False))
    logprob: torch.Tensor | None
    top_logprobs: TopLogprobs | None  # n = the largest ``logprobs`` of the batch; None when no request asks for any


def upload(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host sync (pinned, non-blocking copy on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply): every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_log_exponentials(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``log(E)``, ``E ~ Exp(1)``, (R, V) float32, a pure function of (seed, position, vocabulary index).

    ``seeds`` (R, 2) int64: the low and high 32 bits of each seed; ``positions`` (R,) int64. The uniforms have 23 bits
    (``(k + 0.5) / 2**23``, exact in float32, never 0 or 1), so ``E`` lies in [6e-8, 16.7].
    """
    pos = positions.to(torch.int64)
    key_a = _mix32(_mix32(_mix32(seeds[:, 0] ^ 0x5BD1E995) ^ seeds[:, 1]) ^ (pos & _M32))  # (R,)
    key_b = _mix32(key_a ^ ((pos >> 32) & _M32) ^ 0x27D4EB2F)  # (R,)
    index = _mul32(torch.arange(vocab, device=seeds.device, dtype=torch.int64), 0x9E3779B1)  # (V,)
    bits = _mix32(_mix32(index[None, :] ^ key_a[:, None]) ^ key_b[:, None])  # (R, V) in [0, 2**32)
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    return torch.log(-torch.log(uniform))


def apply_logit_bias(x: torch.Tensor, params: Sequence[SamplingParams], masked: Sequence[Sequence[int]] = ()) -> None:
    """Add each row's ``logit_bias`` to ``x`` (S, V) in place and set its ``masked`` stop tokens (per row; () for
    none) to -inf: one accumulating ``index_put_`` over the (row, token) pairs (-inf + anything stays -inf; a pair
    may repeat). Token ids outside ``x``'s vocabulary are left out (the engine refuses such a bias when it knows the
    vocabulary; a stop id past it can never be sampled). No host sync."""
    vocab = x.shape[1]
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token, bias in p.bias_pairs:
            if token < vocab:
                rows.append(row)
                tokens.append(token)
                values.append(bias)
    for row, stops in enumerate(masked):
        for token in stops:
            if 0 <= token < vocab:
                rows.append(row)
                tokens.append(token)
                values.append(-math.inf)
    if not rows:
        return
    index = upload([rows, tokens], torch.int64, x.device)  # (2, N)
    x.index_put_((index[0], index[1]), upload(values, torch.float32, x.device), accumulate=True)


class Sampler:
    """Samples one token per row of a step's logits; see the module docstring for the pipeline.

    ``seed`` seeds the generator of requests without their own seed (one generator per device, made on first use);
    None draws from torch's default generator of the device. ``eos_token_id``: the end-of-document token that
    ``min_tokens`` masks (besides each request's ``stop_token_ids``); None: none.
    """

    def __init__(self, *, seed: int | None = None, eos_token_id: int | None = None) -> None:
        self.seed = seed
        self.eos_token_id = eos_token_id
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @no_grad
    def sample(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        positions: torch.Tensor | None = None,
        *,
        logprobs: bool = True,
    ) -> SampleOutput:
        """``logits`` (S, V) of each request's next token; ``positions`` (S,) int64: that token's index in its
        sequence (default: each state's ``num_tokens``). Returns tokens, logprobs and top logprobs on the logits'
        device; with ``logprobs=False`` the chosen tokens' logprobs are not computed (``logprob`` None), nor the
        top-n unless a request asks for it. A batch of greedy, unpenalised rows with no logprobs wanted is one
        ``argmax`` of the logits as they come (the same tokens: widening to float32 is exact)."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), (tuple(logits.shape), len(states))
        num_rows, vocab = logits.shape
        device = logits.device
        params = [s.params for s in states]
        masked = [self._stops_masked(s) for s in states]
        plain = not any(masked) and all(p.logit_bias is None for p in params)
        if (
            plain
            and not logprobs
            and all(p.temperature < GREEDY_BELOW and not p.logprobs and not p.penalised for p in params)
        ):
            return SampleOutput(token_ids=logits.argmax(dim=-1), logprob=None, top_logprobs=None)
        x = logits.to(torch.float32, copy=True)  # (S, V)
        if not plain:
            apply_logit_bias(x, params, masked)

        penalised = [i for i, p in enumerate(params) if p.penalised]
        if penalised:
            self._apply_penalties(x, [states[i] for i in penalised], penalised, num_rows)

        greedy = [p.greedy for p in params]
        if not all(greedy):  # greedy rows divide by 1: their argmax and logprobs are of the penalised logits
            temps = [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]
            x = x.div_(upload(temps, torch.float32, device)[:, None])
        token_ids = x.argmax(dim=-1) if any(greedy) else torch.empty(num_rows, dtype=torch.int64, device=device)

        rows = [i for i, g in enumerate(greedy) if not g]
        if rows:
            if positions is None:
                positions = upload([s.num_tokens for s in states], torch.int64, device)
            sampled = self._sample_random(x, params, rows, positions)
            if len(rows) == num_rows:
                token_ids = sampled
            else:
                token_ids = token_ids.index_copy(0, upload(rows, torch.int64, device), sampled)

        top_n = max((p.logprobs or 0 for p in params), default=0)
        if not logprobs and top_n == 0:
            return SampleOutput(token_ids=token_ids, logprob=None, top_logprobs=None)
        norm = torch.logsumexp(x, dim=-1)  # (S,)
        logprob = x.gather(1, token_ids[:, None])[:, 0] - norm if logprobs else None
        top = None
        if top_n > 0:
            values, ids = torch.topk(x, min(top_n, vocab), dim=-1)
            top = TopLogprobs(ids=ids, values=values - norm[:, None])
        return SampleOutput(token_ids=token_ids, logprob=logprob, top_logprobs=top)

    def _stops_masked(self, state: SamplingState) -> list[int]:
        """The stop tokens ``min_tokens`` masks for ``state``'s next token (empty once it has enough output)."""
        params = state.params
        if len(state.output_token_ids) >= params.min_tokens:
            return []
        eos = self.eos_token_id
        return [*params.stop_token_ids, *([eos] if eos is not None and not params.ignore_eos else [])]

    def _apply_penalties(self, x: torch.Tensor, states: list[SamplingState], rows: list[int], num_rows: int) -> None:
        """Penalise rows ``rows`` of ``x`` (S, V) in place, updating each state's device counts first."""
        device, vocab = x.device, x.shape[1]
        pair_rows: list[int] = []
        pair_tokens: list[int] = []
        for j, s in enumerate(states):
            counts = s._counts
            if (
                counts is None
                or counts.shape[0] != vocab
                or counts.device != device
                or len(s.output_token_ids) < s._counted
            ):
                s._counts, s._counted = torch.zeros(vocab, dtype=torch.int32, device=device), 0
            new = s.output_token_ids[s._counted :]
            pair_rows += [j] * len(new)
            pair_tokens += new
            s._counted = len(s.output_token_ids)
        counts = torch.stack([s._counts for s in states if s._counts is not None])  # (P, V) int32
        if pair_tokens:
            pairs = upload([pair_rows, pair_tokens], torch.int64, device)  # (2, N)
            counts.index_put_((pairs[0], pairs[1]), torch.ones_like(pairs[0], dtype=torch.int32), accumulate=True)
            for j in sorted(set(pair_rows)):
                s_counts = states[j]._counts
                assert s_counts is not None
                s_counts.copy_(counts[j])

        index = None if len(rows) == num_rows else upload(rows, torch.int64, device)
        sub = x if index is None else x.index_select(0, index)  # (P, V)
        params = [s.params for s in states]
        rep = [p.repetition_penalty for p in params]
        if any(r != 1 for r in rep):
            seen = counts > 0
            for j, s in enumerate(states):
                if s.params.repetition_penalty != 1:
                    seen[j] |= self._prompt_mask(s, vocab, device)
            penalty = upload(rep, torch.float32, device)[:, None].expand_as(sub)
            scaled = torch.where(sub > 0, sub / penalty, sub * penalty)
            sub = torch.where(seen, scaled, sub)
        factors = upload([[p.frequency_penalty, p.presence_penalty] for p in params], torch.float32, device)  # (P, 2)
        sub = sub - factors[:, :1] * counts - factors[:, 1:] * (counts > 0)
        if index is None:
            x.copy_(sub)
        else:
            x.index_copy_(0, index, sub)

    @staticmethod
    def _prompt_mask(state: SamplingState, vocab: int, device: torch.device) -> torch.Tensor:
        mask = state._prompt_mask
        if mask is None or mask.shape[0] != vocab or mask.device != device:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in state.prompt_token_ids if 0 <= t < vocab]
            if ids:
                mask[upload(ids, torch.int64, device)] = True
            state._prompt_mask = mask
        return mask

    def _sample_random(
        self, x: torch.Tensor, params: list[SamplingParams], rows: list[int], positions: torch.Tensor
    ) -> torch.Tensor:
        """Tokens (R,) for the non-greedy rows ``rows`` of the temperature-scaled logits ``x`` (S, V)."""
        device, vocab = x.device, x.shape[1]
        index = None if len(rows) == x.shape[0] else upload(rows, torch.int64, device)
        sub = x if index is None else x.index_select(0, index)  # (R, V)
        chosen = [params[i] for i in rows]

        if any(p.top_k > 0 or p.top_p < 1 for p in chosen):
            sorted_logits, order = sub.sort(dim=-1, descending=True)  # (R, V)
            ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in chosen]
            kth = sorted_logits.gather(1, upload(ks, torch.int64, device)[:, None] - 1)  # (R, 1)
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            top_p = upload([p.top_p for p in chosen], torch.float32, device)[:, None]
            drop = mass_before >= top_p
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            sub = torch.empty_like(sub).scatter_(1, order, sorted_logits)
        if any(p.min_p > 0 for p in chosen):
            log_min_p = upload([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in chosen], torch.float32, device)
            floor = sub.max(dim=-1, keepdim=True).values + log_min_p[:, None]  # log(min_p * p_max), unnormalised
            sub = sub.masked_fill(sub < floor, -math.inf)

        log_e = torch.empty_like(sub)  # (R, V): log of Exp(1) draws
        seeded = [j for j, p in enumerate(chosen) if p.seed is not None]
        unseeded = [j for j, p in enumerate(chosen) if p.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=self._generator(device))
            # a draw of exactly 0 would make a masked token's -inf - log(0) a NaN that argmax picks
            self._put(log_e, unseeded, draws.clamp_min_(torch.finfo(torch.float32).tiny).log_(), device)
        if seeded:
            seeds = [[p.seed & _M32, (p.seed >> 32) & _M32] for p in (chosen[j] for j in seeded) if p.seed is not None]
            seeded_rows = upload([rows[j] for j in seeded], torch.int64, device)
            pos = positions.to(device=device, dtype=torch.int64).index_select(0, seeded_rows)
            self._put(log_e, seeded, seeded_log_exponentials(upload(seeds, torch.int64, device), pos, vocab), device)
        return (sub - log_e).argmax(dim=-1)

    @staticmethod
    def _put(out: torch.Tensor, rows: list[int], values: torch.Tensor, device: torch.device) -> None:
        if len(rows) == out.shape[0]:
            out.copy_(values)
        else:
            out.index_copy_(0, upload(rows, torch.int64, device), values)
