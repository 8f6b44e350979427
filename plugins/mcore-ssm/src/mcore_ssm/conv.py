"""Causal depthwise conv1d over packed documents, with a conv state for prefill continuation and decode.

Shape legend: B rows, T tokens per row, N = B * T tokens, C channels, K kernel width, S sequences
(segments: rows, or documents under ``cu_seqlens``; ``mcore_ssm.packing``).

GDN and Mamba2 both run a short causal conv (K = 4) over their projected channels before the
recurrence. Output ``t`` of channel ``c`` is ``sum_j weight[c, j] * x[t - (K - 1) + j, c] (+ bias[c])``:
``weight[:, -1]`` multiplies the current token (``nn.Conv1d``'s layout with its singleton dim
dropped). A window never reaches across a document: positions before a segment's start read its
``initial_state`` (zeros without one). The conv state of a sequence is the last ``K - 1`` inputs it
has seen, ``(S, C, K - 1)``, oldest first (the layout of the ``causal-conv1d`` package), in ``x``'s dtype.

* ``causal_conv1d``: a whole step (training, prefill, an engine step of packed sequences);
  returns the final state of each segment when asked.
* ``causal_conv1d_step``: one new token per sequence (decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore_ssm.packing import Segments, check_state_count, segments_of

ACTIVATIONS: tuple[str, ...] = ("silu", "none")


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation == "none":
        return y
    raise ValueError(f"activation = {activation!r}; allowed: {', '.join(ACTIVATIONS)}")


def _check(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, rows: int) -> None:
    channels, width = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"conv1d: x has {x.shape[-1]} channels, weight {tuple(weight.shape)} expects {channels}")
    if state is not None and tuple(state.shape) != (rows, channels, width - 1):
        raise ValueError(
            f"conv1d: state of shape {tuple(state.shape)}; expected {(rows, channels, width - 1)} (S, C, K - 1)"
        )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str = "silu",
    return_final_state: bool = False,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv1d of ``x (B, T, C)`` with ``weight (C, K)``, ``bias (C,)``, then ``activation``.

    ``cu_seqlens`` (``(D + 1,)`` over the ``B * T`` tokens): no window crosses a document (nor a row end).
    ``initial_state (S, C, K - 1)``: the inputs before each segment's first token (one per row, or one per
    document under ``cu_seqlens``: documents then must be non-empty and within a row); zeros without it.
    Returns ``(y (B, T, C), final_state (S, C, K - 1) or None)``: the final state (with
    ``return_final_state``) is the last ``K - 1`` inputs of each segment, reaching into its initial state
    when the segment is shorter than ``K - 1``. Differentiable in ``x``, ``weight``, ``bias`` and the state.
    ``segments``: ``documents(B, T, cu_seqlens)`` when the caller has it already (one per block call).
    """
    batch, seq, channels = x.shape
    width = weight.shape[1]
    if cu_seqlens is None:  # rows are the segments: one grouped conv over the row with its state prepended
        _check(x, weight, initial_state, batch)
        xt = x.transpose(1, 2)  # (B, C, T)
        head = initial_state if initial_state is not None else xt.new_zeros(batch, channels, width - 1)
        padded = torch.cat([head.to(x.dtype), xt], dim=2)  # (B, C, K - 1 + T)
        y = F.conv1d(
            padded, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype), groups=channels
        )
        final = padded[:, :, seq:] if return_final_state else None  # (B, C, K - 1)
        return _activate(y.transpose(1, 2), activation), final  # (B, T, C)
    segments = segments_of(batch, seq, cu_seqlens, x.device, segments)
    if initial_state is not None:
        check_state_count(segments, initial_state.shape[0], cu_seqlens, "conv1d initial_state")
        _check(x, weight, initial_state, segments.count)
    else:
        _check(x, weight, None, 0)
    flat = x.reshape(batch * seq, channels)  # (N, C)
    y = _packed_conv(flat, weight.to(x.dtype), segments, initial_state)  # (N, C)
    if bias is not None:
        y = y + bias.to(x.dtype)
    final = _final_state(flat, segments, initial_state, width) if return_final_state else None
    return _activate(y, activation).view(batch, seq, channels), final


def _state_at(
    state: torch.Tensor | None, segments: Segments, back: torch.Tensor, flat: torch.Tensor
) -> torch.Tensor | None:
    """``(N, C)``: for each token, the input ``back`` (``(N,)``, >= 1 where used) places before its segment's
    start, read from the segment's state (``None`` without a state: zeros)."""
    if state is None:
        return None
    width_m1 = state.shape[2]
    index = (width_m1 - back).clamp(0, width_m1 - 1)  # (N,) column of the state, oldest first
    return state.to(flat.dtype)[segments.seg, :, index]  # (N, C)


def _packed_conv(
    flat: torch.Tensor, weight: torch.Tensor, segments: Segments, state: torch.Tensor | None
) -> torch.Tensor:
    """The conv over flat tokens ``(N, C)``: one shifted, masked copy per tap (K is small: 4)."""
    tokens = flat.shape[0]
    width = weight.shape[1]
    out = flat * weight[:, width - 1]  # (N, C), the current token's tap
    for lag in range(1, width):
        shifted = F.pad(flat, (0, 0, lag, 0))[:tokens]  # (N, C): token t - lag (zeros before the first)
        inside = (segments.pos >= lag)[:, None]  # (N, 1): t - lag lies in t's segment
        before = _state_at(state, segments, lag - segments.pos, flat)
        tap = torch.where(inside, shifted, before if before is not None else torch.zeros_like(shifted))
        out = out + tap * weight[:, width - 1 - lag]
    return out


def _final_state(flat: torch.Tensor, segments: Segments, state: torch.Tensor | None, width: int) -> torch.Tensor:
    """``(S, C, K - 1)``: the last ``K - 1`` inputs of each segment (into its initial state if it is shorter)."""
    offsets = torch.arange(width - 1, device=flat.device) - (width - 1)  # (K - 1,): -(K-1) .. -1
    where = segments.lengths[:, None] + offsets  # (S, K - 1) position in the segment, negative: in the state
    tokens = flat[(segments.starts[:, None] + where.clamp(min=0)).clamp(max=flat.shape[0] - 1)]  # (S, K - 1, C)
    if state is None:
        before = torch.zeros_like(tokens)
    else:
        column = (where + width - 1).clamp(0, width - 2)  # (S, K - 1)
        rows = torch.arange(segments.count, device=flat.device)[:, None]
        before = state.to(flat.dtype).transpose(1, 2)[rows, column]  # (S, K - 1, C)
    return torch.where((where >= 0)[..., None], tokens, before).transpose(1, 2)  # (S, C, K - 1)


def causal_conv1d_step(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: ``x (S, C)`` the new token of each sequence, ``state (S, C, K - 1)`` its previous inputs.

    Returns ``(y (S, C), new_state (S, C, K - 1))`` (the state shifted by one, ``x`` appended); the
    inputs are not modified.
    """
    _check(x, weight, state, x.shape[0])
    window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # (S, C, K)
    y = (window * weight.to(x.dtype)).sum(-1)  # (S, C)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return _activate(y, activation), window[:, :, 1:]
