"""Speculative sampling: accept a sequence's draft tokens so that its output is distributed as the target's.

Why a module of its own: the acceptance rule is the part of speculative decoding whose correctness is a
statement about distributions (Leviathan et al. 2023, Chen et al. 2023), tested on its own with many samples;
``speculative.py`` drafts and drives the caches, this module only decides.

For draft tokens ``x_1..x_n`` drawn from the draft distributions ``q_1..q_n``, and the target distributions
``p_1..p_{n+1}`` (``p_i`` given the prefix with ``x_1..x_{i-1}``): ``x_i`` is accepted, in order, while
``u_i < p_i(x_i) / q_i(x_i)`` (``u_i ~ U(0, 1)``, i.e. with probability ``min(1, p/q)``); at the first rejection
the token is drawn from ``norm(max(0, p_i - q_i))`` and the rest are dropped; when all ``n`` are accepted a bonus
token is drawn from ``p_{n+1}``. Each emitted token is then distributed as ``p`` given the tokens before it.
A greedy request has one-hot ``p`` (its argmax) and ``q`` (its draft): the rule becomes "accept while the draft
is the target's argmax, then emit the argmax": exactly greedy decoding.

``target_distribution`` turns logits into ``p`` (or ``q``) with the request's logit bias, temperature, top-k, top-p
and min-p, as ``sampling.Sampler`` does (penalties are not applied: the engine drafts only for requests without; nor
is the ``min_tokens`` mask: a request drafts only once it has ``min_tokens`` output tokens, so no verified row needs
it). The drafts use the same function, so they see the bias too (a forced token is drafted, and accepted).

Shape legend: B sequences, n most drafts of one sequence, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mcore_inference.sampling import SamplingParams, apply_logit_bias, upload


def target_distribution(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities ``(R, V)`` float32 of the rows of ``logits (R, V)``, each under its ``params``: greedy rows
    one-hot at the argmax, the others softmax of ``logits / temperature`` after top-k (ties with the k-th kept),
    top-p (the smallest head reaching ``top_p``, the most likely token always kept) and min-p; each row's
    ``logit_bias`` is added first (greedy rows too)."""
    assert logits.dim() == 2 and logits.shape[0] == len(params), (tuple(logits.shape), len(params))
    rows, vocab = logits.shape
    device = logits.device
    x = logits.to(torch.float32, copy=True)  # (R, V)
    apply_logit_bias(x, params)
    biased = x  # (R, V): the greedy rows' argmax is of these
    greedy = upload([p.greedy for p in params], torch.bool, device)  # (R,); no host sync
    temps = upload([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
    x = x / temps[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy):
        sorted_logits, order = x.sort(dim=-1, descending=True)  # (R, V)
        ks = upload([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], torch.int64, device)
        kth = sorted_logits.gather(1, ks[:, None] - 1)  # (R, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        top_p = upload([p.top_p for p in params], torch.float32, device)[:, None]
        drop = mass_before >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        x = torch.empty_like(x).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params if not p.greedy):
        log_min_p = upload([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], torch.float32, device)
        floor = x.max(dim=-1, keepdim=True).values + log_min_p[:, None]  # log(min_p * p_max), unnormalised
        x = x.masked_fill(x < floor, -math.inf)
    probs = x.softmax(dim=-1)  # (R, V)
    if any(p.greedy for p in params):  # from the host-side params: no device sync
        one_hot = torch.zeros_like(probs).scatter_(1, biased.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def gumbel_pick(probs: torch.Tensor, log_exponentials: torch.Tensor) -> torch.Tensor:
    """A draw ``(R,)`` from each row of ``probs (R, V)`` by Gumbel-max: ``argmax(log p - log E)``, ``E ~ Exp(1)``
    given as ``log_exponentials (R, V)``; a zero-probability token is never drawn."""
    return (probs.log() - log_exponentials).argmax(dim=-1)


class Verdict(NamedTuple):
    num_accepted: torch.Tensor  # (B,) int64: leading drafts accepted
    next_token: torch.Tensor  # (B,) int64: the token after them (from the residual, or the bonus from p_{n+1})


def rejection_sample(
    target: torch.Tensor,
    draft: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    log_exponentials: torch.Tensor,
) -> Verdict:
    """Accept drafts by the module docstring's rule, for B sequences at once.

    ``target (B, n + 1, V)``: ``p_1..p_{n+1}`` (row ``num_drafts[b]`` of sequence ``b`` is its bonus row; rows
    after it are ignored); ``draft (B, n, V)``: ``q_1..q_n``; ``draft_tokens (B, n)`` int64, each drawn from its
    ``q``; ``num_drafts (B,)`` int64 in ``0..n``; ``uniforms (B, n)`` in ``(0, 1)``; ``log_exponentials
    (B, n + 1, V)``: ``log E`` for the Gumbel-max draw of the token at each row. No host sync.
    """
    batch, n = draft_tokens.shape
    device = target.device
    rows = torch.arange(batch, device=device)
    if n:
        p_x = target[:, :n].gather(2, draft_tokens[..., None])[..., 0]  # (B, n)
        q_x = draft.gather(2, draft_tokens[..., None])[..., 0]  # (B, n)
        real = torch.arange(n, device=device)[None, :] < num_drafts[:, None]  # (B, n)
        accept = (uniforms * q_x < p_x) & real  # u < p/q, q(x) > 0 for a drawn x
        num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # (B,) leading accepts
    else:
        num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    p = target[rows, num_accepted]  # (B, V): p at the first rejection, or the bonus row
    if n:
        q = draft[rows, num_accepted.clamp(max=n - 1)]  # (B, V)
        rejected = (num_accepted < num_drafts)[:, None]
        residual = (p - q).clamp_min(0.0)
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q where rejection cannot happen; keep p
        p = torch.where(rejected & ~empty, residual, p)
    next_token = gumbel_pick(p, log_exponentials[rows, num_accepted])
    return Verdict(num_accepted=num_accepted, next_token=next_token)
