"""``LockstepEngine``: one ``LLMEngine`` per rank, stepped in lockstep, for models sharded over ranks (``ep``).

Why it exists: under expert parallelism (the ``ep`` layout) every rank holds the dense weights and ``E / W`` of the
experts, and each ``moe`` block's inference path all-gathers the step's tokens over the ep group. So every rank
must make the same model call at every step: same sequences, same token counts, same order. Each rank runs its own
``LLMEngine`` over the same requests; the scheduler, the cache and the sampler are deterministic given the same
requests, the same configuration and the same seed, so identical inputs give identical steps.

The leader (rank 0 of ``group``) owns the request stream: ``add_request`` and ``abort`` act on its engine at once
and are recorded; ``step`` broadcasts the records gathered since the last step (one ``broadcast_object_list``:
small picklable records, token ids rather than text), then steps. Every other rank runs ``follow()``: receive a
step's record, replay its adds and aborts in order (each add must get the leader's request id), step, until the
leader's ``stop()`` sends the stop record. Each record also carries a digest of the leader's previous step outputs
(request ids, tokens, finish reasons) and one of its scheduler and cache after the ops (running and waiting ids,
free blocks); a follower whose own differ raises (``LockstepDiverged``) before its next model call, rather than
serving different tokens or making a collective of another shape than the leader's.

Building one is a collective (``all_gather_object``): every rank's engine configuration (cache, scheduler limits,
static decode sizes, speculation, seed) must match, and the engine needs a ``seed`` (requests without their own
seed draw noise from the engine's generator: unseeded, the ranks would sample differently); a mismatch raises
the same one-line ``UserError`` on every rank.

Timeouts: nothing here waits forever as long as ``group`` has a timeout (``dist.new_group(backend="gloo",
timeout=timedelta(seconds=...))``; the default group's is ``init_process_group``'s). A follower waits for the next
record at most that long, so an idle leader must step (an empty record, no model call) more often:
``keepalive()`` does when ``keepalive_s`` passed since the last record. A leader that dies makes the followers'
wait fail (gloo: connection closed, or the timeout). The model's own collectives (the moe all-gathers) use the ep
group of the layout, with that group's timeout.

``group`` carries only these records: a gloo (CPU) group over the same ranks as the model's (the ep group may be
NCCL). Static decode and CUDA graphs are fine: the padded sizes follow from the step, the same on every rank.

Serving over HTTP: on the leader, ``build_app(lockstep_engine, ...)`` serves it from the server's engine thread
(``server.engine_loop.EngineLoop``: it sends keepalives while idle and the stop record at shutdown); the other
ranks call ``follow()``. The engine-process mode (``EngineProcess``) does not take one: the engine must be built
in the rank's own process, with its group.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from mcore.errors import UserError
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams


class LockstepDiverged(RuntimeError):
    """A follower's step outputs differ from the leader's (a nondeterministic model or rank-dependent setup)."""


@dataclass(frozen=True)
class _Add:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    extra_key: Hashable


@dataclass(frozen=True)
class _Abort:
    request_id: int


@dataclass
class _Record:
    """What the leader broadcasts before each step (or to stop)."""

    step: int  # the leader's steps so far
    digest: int  # of the leader's outputs of its previous step
    state: int  # of the leader's scheduler and cache after the ops, before the step
    ops: list[_Add | _Abort] = field(default_factory=list)
    stop: bool = False


def outputs_digest(outputs: Sequence[RequestOutput]) -> int:
    """A checksum of a step's outputs: request ids, new tokens, finish reasons (crc32 of their repr)."""
    key = [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs]
    return zlib.crc32(repr(key).encode())


def schedule_digest(engine: LLMEngine) -> int:
    """A checksum of what the next step's schedule depends on: running and waiting ids in order, free blocks."""
    scheduler = engine.scheduler
    key = (
        [s.seq_id for s in scheduler.running],
        [s.seq_id for s in scheduler.waiting],
        engine.cache.num_free_blocks(),
    )
    return zlib.crc32(repr(key).encode())


def engine_fingerprint(engine: LLMEngine) -> dict[str, Any]:
    """What must be equal on every rank for the engines to schedule and sample identically."""
    decoder = engine.decoder
    spec = engine.speculator
    return {
        "model": type(engine.model).__name__,
        "block_size": engine.cache.block_size,
        "num_blocks": engine.cache.num_blocks,
        "max_num_seqs": engine.scheduler.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "max_model_len": engine.max_model_len,
        "prefix_caching": engine.cache.prefix_caching,
        "eos_token_id": engine.eos_token_id,
        "seed": engine.sampler.seed,
        "static_decode": None if decoder is None else (list(decoder.sizes), decoder.cuda_graphs),
        "speculative_tokens": 0 if spec is None else spec.k,
    }


class LockstepEngine:
    """Drive ``engine`` in lockstep over ``engine.lockstep_group`` (module docstring).

    Group rank 0 (the leader) calls ``add_request``, ``abort``, ``step``, ``has_unfinished`` and finally
    ``stop()`` (or uses the object as a context manager); the others call ``follow()``, which returns at the stop.
    ``keepalive_s``: how long an idle leader may stay silent before ``keepalive()`` steps (keep it below the
    group's timeout).
    """

    def __init__(self, engine: LLMEngine, *, keepalive_s: float = 10.0) -> None:
        group = engine.lockstep_group
        if group is None:
            raise UserError(
                "LockstepEngine: the engine has no lockstep_group; build it with LLMEngine(..., lockstep_group=pg) "
                "(pg: a gloo group of the ranks that serve the model)"
            )
        if not keepalive_s > 0:
            raise UserError(f"LockstepEngine keepalive_s = {keepalive_s!r}: must be > 0 (seconds)")
        self.engine = engine
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.keepalive_s = keepalive_s
        self._ops: list[_Add | _Abort] = []
        self._digest = outputs_digest([])
        self._steps = 0
        self._stopped = False
        self._last_sent = time.monotonic()
        self._check_setup()

    @property
    def stopped(self) -> bool:
        """The stop record was sent (leader) or received (follower)."""
        return self._stopped

    @property
    def lockstep_steps(self) -> int:
        """Records sent as steps (leader) or steps replayed (follower)."""
        return self._steps

    def __getattr__(self, name: str) -> Any:
        """Anything else is read from the engine (``cache``, ``scheduler``, ``tokenizer``, ``num_steps``...): the
        server reads them; requests go through the methods above."""
        if name == "engine":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _check_setup(self) -> None:
        mine = engine_fingerprint(self.engine)
        everyone: list[Any] = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group)
        for rank, theirs in enumerate(everyone):
            differ = [k for k in mine if theirs.get(k) != everyone[0].get(k)]
            if differ:
                key = differ[0]
                raise UserError(
                    f"LockstepEngine: engine {key} = {theirs[key]!r} on rank {rank} but {everyone[0][key]!r} on "
                    "rank 0; allowed: the same engine configuration on every rank"
                )
        if mine["seed"] is None:
            raise UserError(
                "LockstepEngine: the engine's seed is None (requests without a seed would sample differently on "
                "each rank); allowed: LLMEngine(seed=<int>), the same on every rank"
            )

    def _lead(self, what: str) -> None:
        if not self.is_leader:
            raise RuntimeError(f"LockstepEngine.{what}: only the leader (group rank 0) calls it; rank {self.rank} "
                               "runs follow()")  # fmt: skip
        if self._stopped:
            raise RuntimeError(f"LockstepEngine.{what}: the engine was stopped")

    # ----- the leader -----

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, extra_key: Hashable = None
    ) -> int:
        """``LLMEngine.add_request`` on the leader, replayed by the followers before the next step (as token ids)."""
        self._lead("add_request")
        params = SamplingParams() if params is None else params
        request_id = self.engine.add_request(prompt, params, extra_key=extra_key)  # a bad request raises: no record
        ids = list(self.engine._requests[request_id].sampling.prompt_token_ids)
        self._ops.append(_Add(request_id, ids, params, extra_key))
        return request_id

    def abort(self, request_id: int) -> RequestOutput | None:
        """``LLMEngine.abort`` on the leader; the followers abort it before the next step."""
        self._lead("abort")
        out = self.engine.abort(request_id)
        if out is not None:
            self._ops.append(_Abort(request_id))
        return out

    def has_unfinished(self) -> bool:
        """Requests running or waiting, or adds and aborts the followers have not seen yet."""
        return self.engine.has_unfinished() or bool(self._ops)

    def step(self) -> list[RequestOutput]:
        """Send the step's record, then ``LLMEngine.step`` (with nothing to run: a keepalive, no model call)."""
        self._lead("step")
        self._send(_Record(self._steps, self._digest, schedule_digest(self.engine), self._ops))
        self._ops = []
        outputs = self.engine.step()
        self._digest = outputs_digest(outputs)
        self._steps += 1
        return outputs

    def keepalive(self) -> bool:
        """Step when ``keepalive_s`` passed since the last record (an idle leader: the followers' wait must not reach
        the group's timeout); whether it stepped. Outputs of such a step (none without work) are dropped."""
        if time.monotonic() - self._last_sent < self.keepalive_s:
            return False
        self.step()
        return True

    def stop(self) -> None:
        """Send the stop record: the followers' ``follow()`` returns. Idempotent."""
        if not self.is_leader or self._stopped:
            return
        self._send(_Record(self._steps, self._digest, schedule_digest(self.engine), self._ops, stop=True))
        self._ops = []
        self._stopped = True

    def __enter__(self) -> LockstepEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self, record: _Record) -> None:
        dist.broadcast_object_list([record], group=self.group, group_src=0)
        self._last_sent = time.monotonic()

    # ----- the followers -----

    def follow(self, max_steps: int | None = None) -> int:
        """Replay the leader's steps until its stop record (or ``max_steps`` more steps: the caller follows on
        later); the steps run so far. Raises ``LockstepDiverged`` when this rank's outputs of a step differ from
        the leader's."""
        if self.is_leader:
            raise RuntimeError("LockstepEngine.follow: the leader (group rank 0) drives; the other ranks follow")
        if self._stopped:
            return self._steps
        engine = self.engine
        end = None if max_steps is None else self._steps + max_steps
        while end is None or self._steps < end:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, group=self.group, group_src=0)
            record: _Record = box[0]
            if record.step != self._steps or record.digest != self._digest:
                raise LockstepDiverged(
                    f"LockstepEngine: rank {self.rank} after step {self._steps} differs from the leader (its step "
                    f"{record.step}, digest {record.digest:#x} vs {self._digest:#x})"
                )
            for op in record.ops:
                if isinstance(op, _Abort):
                    engine.abort(op.request_id)
                    continue
                got = engine.add_request(op.prompt, op.params, extra_key=op.extra_key)
                if got != op.request_id:
                    raise LockstepDiverged(
                        f"LockstepEngine: rank {self.rank} gave request id {got} to the leader's {op.request_id}"
                    )
            if schedule_digest(engine) != record.state:
                raise LockstepDiverged(
                    f"LockstepEngine: rank {self.rank} before step {self._steps} holds other requests or blocks than "
                    "the leader (running, waiting ids or free blocks differ)"
                )
            if record.stop:
                self._stopped = True
                return self._steps
            self._digest = outputs_digest(engine.step())
            self._steps += 1
        return self._steps
