"""Pipeline schedules as pure per-rank action lists, and a simulator that checks and times them.

A schedule is, for each rank, the ordered list of what it computes: ``F`` (forward of micro-batch
``mb`` through stage ``stage``), ``B`` (its backward: input and weight gradients, or only the input
gradient when a ``W`` follows) and ``W`` (the deferred weight gradient, zero-bubble). ``with_comms``
adds the transfers: ``RECV_F``/``RECV_B`` just before the action that needs the activation or its
gradient from another rank, ``SEND_F``/``SEND_B`` just after the action that made it. The executor
(``pp.py``) walks these lists; nothing here touches torch.

Schedules (``p`` ranks, ``m`` micro-batches, ``v`` stages per rank, stage ``s`` on rank ``s % p``):

* ``interleaved(p, m, v)``: Megatron's interleaved 1F1B: micro-batches go through a rank's chunks in
  groups of ``p``; ``(p - r - 1) * 2 + (v - 1) * p`` warm-up forwards on rank ``r``, then one forward
  and one backward alternately, then the remaining backwards. ``m`` must be a multiple of ``p``
  when ``v > 1``. With ``v = 1`` it is plain 1F1B (``one_f_one_b``): ``p - r - 1`` warm-up forwards.
* ``zero_bubble_h1(p, m)``: ZB-H1: backward split into ``B`` (input gradient: what the previous stage
  waits for) and ``W`` (weight gradient: nobody waits for it). The order comes from a list scheduler
  over unit costs: a rank runs a deferred ``W`` when ``p - 1`` are pending, else a ready ``B``, else a
  ready ``F`` while fewer than ``p - r`` forwards await their ``B`` (1F1B's activation memory), else a
  deferred ``W``, so the ``W`` fill what would be bubbles; the rest run at the end. At most ``p - 1``
  weight gradients wait (each holding its linears' inputs and output gradients).

``simulate(actions, costs)`` runs the lists as the executor does (sends never block; a receive waits
for its message and, on a first-in-first-out channel, for every message the peer sent before it on
that channel), checks that every action's inputs exist when it runs and that each ``(F|B|W, mb,
stage)`` runs exactly once, raises ``ScheduleError`` naming the stuck actions on a deadlock, and
returns the timeline: makespan, busy time per rank, the bubble share and the peak number of
micro-batches whose activations a rank holds. ``bubble_theory`` gives the textbook shares to compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

COMPUTE = ("F", "B", "W")
SCHEDULES = ("1f1b", "interleaved", "zb-h1")


class ScheduleError(RuntimeError):
    """A schedule that cannot run: a missing input, an action twice, or a deadlock."""


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's list: ``kind`` in ``F B W SEND_F RECV_F SEND_B RECV_B``; ``peer`` for transfers."""

    kind: str
    mb: int
    stage: int
    peer: int = -1

    def __str__(self) -> str:
        peer = f"@{self.peer}" if self.peer >= 0 else ""
        return f"{self.kind}{self.mb}s{self.stage}{peer}"


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"schedule sizes pp = {p}, micro_batches = {m}, virtual_stages = {v}: each must be >= 1")


def interleaved(p: int, m: int, v: int = 1) -> list[list[Action]]:
    """Interleaved 1F1B with ``v`` chunks per rank (plain 1F1B for ``v = 1``); compute actions per rank."""
    _check_sizes(p, m, v)
    if v > 1 and m % p:
        raise ValueError(f"interleaved 1F1B: micro_batches = {m} must be a multiple of pp = {p}")

    def order(backward: bool) -> list[tuple[int, int]]:
        out = []
        for k in range(m * v):
            group, within = divmod(k, p * v)
            chunk = within // p
            out.append((group * p + within % p, v - 1 - chunk if backward else chunk))  # (mb, chunk)
        return out

    forwards, backwards = order(False), order(True)
    ranks: list[list[Action]] = []
    for r in range(p):
        total = m * v
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total) if v > 1 else min(p - r - 1, total)
        acts = [Action("F", mb, c * p + r) for mb, c in forwards[:warmup]]
        for i in range(total - warmup):
            mb, c = forwards[warmup + i]
            acts.append(Action("F", mb, c * p + r))
            mb, c = backwards[i]
            acts.append(Action("B", mb, c * p + r))
        for mb, c in backwards[total - warmup :]:
            acts.append(Action("B", mb, c * p + r))
        ranks.append(acts)
    return ranks


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """1F1B: ``p - r - 1`` warm-up forwards on rank ``r``, then forward/backward pairs, then backwards."""
    return interleaved(p, m, 1)


def zero_bubble_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 by a unit-cost list scheduler (module docstring); compute actions per rank (stage = rank)."""
    _check_sizes(p, m)
    acts: list[list[Action]] = [[] for _ in range(p)]
    f_done: dict[tuple[int, int], int] = {}  # (mb, stage) -> end time of F
    b_done: dict[tuple[int, int], int] = {}
    next_f = [0] * p
    next_b = [0] * p
    next_w = [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    free_at = [0] * p
    t, total = 0, 3 * m * p
    while sum(len(a) for a in acts) < total:
        for r in range(p):
            if free_at[r] > t:
                continue
            mb_b, mb_f = next_b[r], next_f[r]
            b_ready = (
                mb_b < next_f[r] and f_done[(mb_b, r)] <= t and (r == p - 1 or b_done.get((mb_b, r + 1), t + 1) <= t)
            )
            f_ready = mb_f < m and next_f[r] - next_b[r] < p - r and (r == 0 or f_done.get((mb_f, r - 1), t + 1) <= t)
            if len(pending_w[r]) > p - 1:  # at most p - 1 deferred: enough to fill the end's bubble
                acts[r].append(Action("W", pending_w[r].pop(0), r))
                next_w[r] += 1
            elif b_ready:
                acts[r].append(Action("B", mb_b, r))
                b_done[(mb_b, r)] = t + 1
                next_b[r] += 1
                pending_w[r].append(mb_b)
            elif f_ready:
                acts[r].append(Action("F", mb_f, r))
                f_done[(mb_f, r)] = t + 1
                next_f[r] += 1
            elif pending_w[r]:
                acts[r].append(Action("W", pending_w[r].pop(0), r))
                next_w[r] += 1
            else:
                continue
            free_at[r] = t + 1
        t += 1
        if t > 10 * total + 10:  # cannot happen for a correct scheduler; never loop forever
            raise ScheduleError(f"zero_bubble_h1(p={p}, m={m}): the list scheduler made no progress")
    return acts


def forwards_only(p: int, m: int, v: int = 1) -> list[list[Action]]:
    """Evaluation: every rank runs its stages micro-batch by micro-batch (any ``m``; no backward to interleave)."""
    _check_sizes(p, m, v)
    return [[Action("F", mb, c * p + r) for mb in range(m) for c in range(v)] for r in range(p)]


def build(schedule: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """The compute actions of ``schedule`` (one of ``SCHEDULES``) for every rank."""
    if schedule == "1f1b":
        return one_f_one_b(p, m)
    if schedule == "interleaved":
        return interleaved(p, m, v)
    if schedule == "zb-h1":
        return zero_bubble_h1(p, m)
    raise ValueError(f"schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def with_comms(compute: Sequence[Sequence[Action]], p: int, stages: int) -> list[list[Action]]:
    """Each rank's list with its transfers: receive just before use, send just after (module docstring)."""
    out: list[list[Action]] = []
    for r, acts in enumerate(compute):
        full: list[Action] = []
        for a in acts:
            if a.kind == "F" and a.stage > 0 and (a.stage - 1) % p != r:
                full.append(Action("RECV_F", a.mb, a.stage, (a.stage - 1) % p))
            if a.kind == "B" and a.stage < stages - 1 and (a.stage + 1) % p != r:
                full.append(Action("RECV_B", a.mb, a.stage, (a.stage + 1) % p))
            full.append(a)
            if a.kind == "F" and a.stage < stages - 1 and (a.stage + 1) % p != r:
                full.append(Action("SEND_F", a.mb, a.stage, (a.stage + 1) % p))
            if a.kind == "B" and a.stage > 0 and (a.stage - 1) % p != r:
                full.append(Action("SEND_B", a.mb, a.stage, (a.stage - 1) % p))
        out.append(full)
    return out


def channel_orders(actions: Sequence[Sequence[Action]]) -> dict[tuple[int, int], list[tuple[str, int, int]]]:
    """For each channel ``(src, dst)``, the messages ``(kind, mb, producing stage)`` in the order ``src`` sends them."""
    orders: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if a.kind.startswith("SEND_"):
                orders.setdefault((r, a.peer), []).append((a.kind[-1], a.mb, a.stage))
    return orders


def _message(a: Action) -> tuple[str, int, int]:
    """The message a ``RECV_*`` action waits for, as its sender names it."""
    return (a.kind[-1], a.mb, a.stage - 1 if a.kind == "RECV_F" else a.stage + 1)


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """What ``simulate`` measured."""

    makespan: float
    busy: tuple[float, ...]
    """Compute time of each rank."""
    peak_activations: tuple[int, ...]
    """Most micro-batch stages whose forward ran and whose backward (``W`` when split) has not, per rank."""
    starts: Mapping[tuple[int, str], float] = field(default_factory=dict)
    """Start time of each compute action, keyed by ``(rank, str(action))``."""

    @property
    def bubble(self) -> float:
        """Share of the ranks' time spent idle: ``1 - sum(busy) / (ranks * makespan)``."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0


def simulate(
    actions: Sequence[Sequence[Action]],
    costs: Mapping[str, float],
    *,
    stages: int,
    micro_batches: int,
) -> Timeline:
    """Run the per-rank lists (with transfers, ``with_comms``) on unit-less costs per compute kind (module docstring).

    ``costs``: ``F``, ``B`` and ``W`` (a ``B`` of a schedule without ``W`` should cost both parts)."""
    p = len(actions)
    split = any(a.kind == "W" for acts in actions for a in acts)
    orders = channel_orders(actions)
    position = {(ch, msg): i for ch, msgs in orders.items() for i, msg in enumerate(msgs)}
    sent: dict[tuple[tuple[int, int], int], float] = {}  # (channel, index) -> time sent
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, stage) -> end time
    have: list[set[tuple[str, int, int]]] = [set() for _ in range(p)]  # messages a rank holds (received or local)
    at = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    held = [0] * p
    peak = [0] * p
    starts: dict[tuple[int, str], float] = {}

    def step(r: int) -> bool:
        a = actions[r][at[r]]
        if a.kind.startswith("RECV_"):
            msg = _message(a)
            channel = (a.peer, r)
            index = position.get((channel, msg))
            if index is None:
                raise ScheduleError(f"rank {r}: {a} waits for a message rank {a.peer} never sends")
            if any((channel, i) not in sent for i in range(index + 1)):
                return False
            clock[r] = max(clock[r], sent[(channel, index)])
            have[r].add(msg)
        elif a.kind.startswith("SEND_"):
            msg = (a.kind[-1], a.mb, a.stage)
            if msg not in done:
                raise ScheduleError(f"rank {r}: {a} sends what was not computed")
            sent[((r, a.peer), position[((r, a.peer), msg)])] = clock[r]
        else:
            key = (a.kind, a.mb, a.stage)
            if key in done:
                raise ScheduleError(f"rank {r}: {a} runs twice")
            if a.stage % p != r:
                raise ScheduleError(f"rank {r}: {a} is not this rank's stage")
            if a.kind == "F" and a.stage > 0 and ("F", a.mb, a.stage - 1) not in have[r]:
                raise ScheduleError(f"rank {r}: {a} runs before its input activation arrived")
            if a.kind == "B":
                if ("F", a.mb, a.stage) not in done:
                    raise ScheduleError(f"rank {r}: {a} runs before its forward")
                if a.stage < stages - 1 and ("B", a.mb, a.stage + 1) not in have[r]:
                    raise ScheduleError(f"rank {r}: {a} runs before its output gradient arrived")
            if a.kind == "W" and ("B", a.mb, a.stage) not in done:
                raise ScheduleError(f"rank {r}: {a} runs before its input-gradient backward")
            starts[(r, str(a))] = clock[r]
            clock[r] += costs[a.kind]
            busy[r] += costs[a.kind]
            done[key] = clock[r]
            have[r].add(key)  # a local next stage reads it without a transfer
            if a.kind == "F":
                held[r] += 1
                peak[r] = max(peak[r], held[r])
            elif a.kind == ("W" if split else "B"):
                held[r] -= 1
        at[r] += 1
        return True

    while any(at[r] < len(actions[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while at[r] < len(actions[r]) and step(r):
                progressed = True
        if not progressed:
            stuck = ", ".join(f"rank {r}: {actions[r][at[r]]}" for r in range(p) if at[r] < len(actions[r]))
            raise ScheduleError(f"deadlock: {stuck}")
    backward = any(a.kind == "B" for acts in actions for a in acts)
    kinds = ("F", "B", "W") if split else ("F", "B") if backward else ("F",)  # evaluation: forwards only
    missing = [
        (k, mb, s) for k in kinds for mb in range(micro_batches) for s in range(stages) if (k, mb, s) not in done
    ]
    if missing:
        raise ScheduleError(f"never run: {', '.join(f'{k}{mb}s{s}' for k, mb, s in missing[:6])}")
    return Timeline(makespan=max(clock), busy=tuple(busy), peak_activations=tuple(peak), starts=starts)


def bubble_theory(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Textbook bubble share: (p-1)/(m+p-1) for 1F1B, (p-1)/(v*m+p-1) interleaved, (p-1)/(3m+p-1) for ZB-H1
    (equal F, B and W: the bubble is a third of 1F1B's in time)."""
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    raise ValueError(f"schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def unit_costs(schedule: str, v: int = 1) -> dict[str, float]:
    """F = 1, input gradient = 1, weight gradient = 1 per whole stage; a chunk of ``v`` costs ``1 / v`` of each."""
    unit = 1.0 / v
    if schedule == "zb-h1":
        return {"F": unit, "B": unit, "W": unit}
    return {"F": unit, "B": 2 * unit, "W": unit}
