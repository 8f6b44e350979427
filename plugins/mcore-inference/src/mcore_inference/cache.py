"""``PagedKVCache``: the engine's ``KVCacheHandle``, paged attention caches and recurrent state slots.

Why it exists: the model's blocks append their keys/values and read pages through the core's cache protocol
(``mcore.protocols.block``); the engine sizes, shares and frees those pages. This module holds the tensors and
the per-sequence tables; which block id a token gets, and prefix caching, live in ``block_pool.py``.

Layout. Attention layers are grouped by their sliding window (every full-attention layer, GQA or latent, is
one group): a group has ONE block id space and one block table per sequence, and each layer of the group its
own pages over it, ``(P, bs, nkv, hd)`` keys and ``(P, bs, nkv, hdv)`` values (a latent cache: keys only). A
recurrent layer has ``max_seqs`` state slots. Layers of a group may hold different lengths (a layer that sat a
step out); a block is taken when the first of them crosses into it.

Beyond the protocol the engine uses ``start_sequence`` (begin a sequence from its cached prefix blocks),
``cache_prefix`` (name the sequence's full blocks for later requests), ``blocks_needed`` / ``num_free_blocks``
(admission) and ``all_free`` (tests). Prefix caching is on when every attention layer is a full-attention layer
(one group). With recurrent layers too (hybrid models) it also needs state snapshots (``state_snapshots.py``,
``state_snapshots`` of them, default ``max_seqs``): ``cache_prefix`` snapshots a sequence's recurrent states when
its length is exactly a multiple of the block size (the state right after a named block's last token, keyed by
that block's hash), and ``start_sequence`` cuts a hit back to the deepest block with a snapshot and copies it into
the new sequence's slots. Which boundaries a sequence's steps end on is the scheduler's business
(``Scheduler(align_prefill=True)`` cuts prefill chunks at block boundaries); a boundary no step ends on gets no
snapshot.

Static decode (``static_decode.py``, CUDA graphs): with ``scratch_block`` the pages hold one block more than the
pool, never handed out, which the padding rows of a static-shape decode step write to and read.
``begin_static_decode`` does a pure-decode step's bookkeeping on the host (blocks taken, lengths) and points
``append`` / ``gather`` at persistent device buffers (slots, a padded block table, lengths), so that the
layers' calls have static shapes and no host work: what a captured graph replays. Recurrent layers too (hybrid
models): a sequence has ONE state slot, the same in every recurrent layer, and the pools hold one slot more
(``scratch_state``, never handed out) for the padding rows; in a static step ``recurrent_state`` gathers the rows'
states by the step's device slot index and ``set_recurrent_state`` writes them back with ``index_copy_``. A static
step keeps no per-token states (no rollback inside it): static speculative steps refuse recurrent caches.

FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``, ``kv_quant.py``): every attention layer's pages are
``float8_e4m3fn`` (half a bf16 block's bytes: ``bytes_per_block`` counts it), ``append`` quantises with the
layer's per-head scales (fixed by its first eager append; a static decode step before any freezes them at 1),
``gather`` hands out the fp8 pages and ``kv_scales`` the scales, which ``PagedAttention`` dequantises with.
Each layer counts the values its appends saturated on the device (``fp8_clipped``; padding rows of a static step
are not counted).

Shape legend: P blocks, bs block size, nkv heads, hd key dim, hdv value dim, S sequences of the step, N new
tokens of the step, M blocks of the step's longest table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mcore.errors import UserError
from mcore.observe.memory import available_bytes
from mcore.protocols.block import AttentionCacheSpec, LayerCacheSpec, PagedKV, RecurrentStateSpec
from mcore_inference.block_pool import ROOT_HASH, BlockPool, block_hash, chain_hashes
from mcore_inference.kv_quant import calibrate, quantize, resolve_kv_cache_dtype
from mcore_inference.state_snapshots import StateSnapshots
from mcore_inference.static_decode import StaticStep


@dataclass
class _Group:
    """Attention layers sharing one block id space (same window)."""

    window: int | None
    pool: BlockPool
    layers: list[int]
    tables: dict[int, list[int]] = field(default_factory=dict)  # seq -> block per bs tokens, -1 once freed


@dataclass
class _AttentionLayer:
    spec: AttentionCacheSpec
    group: _Group
    key_pages: torch.Tensor  # (P, bs, nkv, hd)
    value_pages: torch.Tensor | None  # (P, bs, nkv, hdv); None: latent
    lengths: dict[int, int] = field(default_factory=dict)
    # FP8 pages only: per-head fp32 dequantisation scales (nkv,), and whether they are fixed yet
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    calibrated: bool = False
    clipped: torch.Tensor | None = None  # () int64: keys and values saturated by quantisation so far


@dataclass
class _RecurrentLayer:
    """A recurrent layer's state pools; ``free`` and ``slots`` are the cache's, shared by every recurrent layer (a
    sequence has the same slot in each: one device index serves a static step)."""

    spec: RecurrentStateSpec
    slots_pool: dict[str, torch.Tensor]  # name -> (max_seqs [+ 1 scratch], *shape)
    free: list[int]
    slots: dict[int, int]  # seq -> its state slot
    lengths: dict[int, int] = field(default_factory=dict)
    # seq -> (length before its last write, {tokens into that write: state}) for rollback
    history: dict[int, tuple[int, dict[int, dict[str, torch.Tensor]]]] = field(default_factory=dict)


def bytes_per_block(specs: Mapping[int, LayerCacheSpec], block_size: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes one block id costs over all attention layers (each holds ``block_size`` tokens of it), with pages
    in ``kv_cache_dtype`` (``"auto"``: each spec's dtype; ``"fp8_e4m3"``: one byte an element)."""
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    total = 0
    for spec in specs.values():
        if isinstance(spec, AttentionCacheSpec):
            per_token = spec.kv_heads * (spec.head_dim + (spec.value_dim or 0))
            dtype = kv_dtype if kv_dtype is not None else spec.dtype
            total += block_size * per_token * torch.empty(0, dtype=dtype).element_size()
    return total


def snapshot_bytes_each(specs: Mapping[int, RecurrentStateSpec]) -> int:
    """Bytes one recurrent-state snapshot costs: every state of every recurrent layer of ``specs``."""
    total = 0
    for spec in specs.values():
        for shape, dtype in spec.states.values():
            total += math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return total


class PagedKVCache:
    """A ``KVCacheHandle`` over ``{layer_index: spec}`` with ``num_blocks`` blocks of ``block_size`` tokens per
    attention group (or as many as ``memory_bytes`` holds) and ``max_seqs`` slots per recurrent layer; attention
    pages in ``kv_cache_dtype`` (``"auto"``: the specs' dtypes, ``"fp8_e4m3"``: FP8 with per-head scales); with
    recurrent layers, ``state_snapshots`` recurrent-state snapshots for prefix caching (``None``: ``max_seqs``;
    0: prefix caching off); sized by ``memory_bytes``, the snapshots come out of it (the state slots do not)."""

    def __init__(
        self,
        specs: Mapping[int, LayerCacheSpec],
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        max_seqs: int = 256,
        device: torch.device | str = "cpu",
        enable_prefix_caching: bool = True,
        scratch_block: bool = False,
        kv_cache_dtype: str = "auto",
        state_snapshots: int | None = None,
    ) -> None:
        kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        for key, value in (("block_size", block_size), ("max_seqs", max_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"PagedKVCache {key} = {value!r}: must be a positive int")
        if state_snapshots is not None and (
            isinstance(state_snapshots, bool) or not isinstance(state_snapshots, int) or state_snapshots < 0
        ):
            raise UserError(f"PagedKVCache state_snapshots = {state_snapshots!r}: must be an int >= 0 (None: max_seqs)")
        if not specs:
            raise UserError("PagedKVCache: the model declares no cache specs (no layer keeps keys/values or state)")
        if (num_blocks is None) == (memory_bytes is None):
            raise UserError("PagedKVCache: give exactly one of num_blocks and memory_bytes")
        recurrent = {i: s for i, s in specs.items() if isinstance(s, RecurrentStateSpec)}
        windows = {s.window for s in specs.values() if isinstance(s, AttentionCacheSpec)}
        count = max_seqs if state_snapshots is None else state_snapshots
        #: prefix caching: attention layers all full (at least one); with recurrent layers, snapshots too
        self.prefix_caching = enable_prefix_caching and windows == {None} and (not recurrent or count > 0)
        snapshot_bytes = count * snapshot_bytes_each(recurrent) if self.prefix_caching else 0
        if num_blocks is None:
            assert memory_bytes is not None
            per_block = bytes_per_block(specs, block_size, kv_cache_dtype)
            memory_bytes -= snapshot_bytes  # the snapshots come out of the budget
            num_blocks = memory_bytes // per_block if per_block else 1
            num_blocks -= int(scratch_block)  # the scratch block comes out of the budget too
            if num_blocks < 1:
                raise UserError(
                    f"PagedKVCache: {memory_bytes} bytes hold no block of {block_size} tokens ({per_block} bytes each)"
                    + (
                        f" after {snapshot_bytes} bytes of state snapshots (lower state_snapshots)"
                        if snapshot_bytes
                        else ""
                    )
                )
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise UserError(f"PagedKVCache num_blocks = {num_blocks!r}: must be a positive int")
        need = (num_blocks + int(scratch_block)) * bytes_per_block(specs, block_size, kv_cache_dtype) + snapshot_bytes
        have = available_bytes(device) if memory_bytes is None else None  # a budget given was sized to fit already
        if have is not None and need > have:  # a message, not an allocator's MemoryError with an empty message
            raise UserError(
                f"PagedKVCache num_blocks = {num_blocks}: {need / 2**30:,.1f} GiB of cache, more than the "
                f"{have / 2**30:,.1f} GiB free on {device}; allowed: fewer blocks (or a memory fraction)"
            )
        self.block_size, self.num_blocks, self.max_seqs = block_size, num_blocks, max_seqs
        self.device = torch.device(device)
        self.kv_cache_dtype = kv_cache_dtype
        self._store_kv = kv_store_for(self.device)  # one launch for keys and values (CUDA), or None
        #: the block padding rows of a static decode step write to (never in a pool); None without one
        self.scratch_block: int | None = num_blocks if scratch_block else None
        #: the state slot padding rows of a static decode step read and write (never a sequence's); None without
        self.scratch_state: int | None = max_seqs if scratch_block and recurrent else None
        self._has_recurrent = bool(recurrent)
        self._free_slots = list(range(max_seqs - 1, -1, -1))  # state slots, shared by the recurrent layers
        self._slots: dict[int, int] = {}  # seq -> its state slot (every recurrent layer's)
        pages = num_blocks + int(scratch_block)
        self.groups: dict[int | None, _Group] = {}
        self.layers: dict[int, _AttentionLayer | _RecurrentLayer] = {}
        #: recurrent states at block boundaries (hybrid models with prefix caching); None: none kept
        self.snapshots: StateSnapshots | None = None
        for index in sorted(specs):
            spec = specs[index]
            if isinstance(spec, AttentionCacheSpec):
                group = self.groups.get(spec.window)
                if group is None:
                    pool = BlockPool(num_blocks, on_forget=self._forget_snapshot)
                    group = self.groups[spec.window] = _Group(spec.window, pool, [])
                group.layers.append(index)
                shape, dtype = (pages, block_size, spec.kv_heads), kv_dtype if kv_dtype is not None else spec.dtype
                keys = torch.zeros(*shape, spec.head_dim, dtype=dtype, device=self.device)
                values = None
                if spec.value_dim is not None:
                    values = torch.zeros(*shape, spec.value_dim, dtype=dtype, device=self.device)
                layer = _AttentionLayer(spec, group, keys, values)
                if kv_dtype is not None:  # scale 1 until the first eager append fixes them
                    layer.clipped = torch.zeros((), dtype=torch.int64, device=self.device)
                    layer.key_scale = torch.ones(spec.kv_heads, dtype=torch.float32, device=self.device)
                    if values is not None:
                        layer.value_scale = torch.ones(spec.kv_heads, dtype=torch.float32, device=self.device)
                self.layers[index] = layer
            elif isinstance(spec, RecurrentStateSpec):
                rows = max_seqs + int(self.scratch_state is not None)
                pools = {n: torch.zeros(rows, *s, dtype=d, device=self.device) for n, (s, d) in spec.states.items()}
                self.layers[index] = _RecurrentLayer(spec, pools, self._free_slots, self._slots)
            else:
                raise UserError(
                    f"layer {index}: cache spec {spec!r} is not an AttentionCacheSpec or RecurrentStateSpec"
                )
        if self.prefix_caching and recurrent:
            self.snapshots = StateSnapshots(recurrent, count, self.device)
        self._lengths: dict[int, int] = {}  # seq -> the longest length any layer may hold
        self._last_step: dict[int, int] = {}  # seq -> its length before its last step (rollback floor)
        self._hashes: dict[int, list[bytes]] = {}  # seq -> hashes of its full blocks named so far
        self._step: tuple[list[int], list[int]] | None = None
        self._written: set[int] = set()
        self._memo: dict[tuple[Any, ...], Any] = {}  # per step: slots of an append, tables of a gather
        self._static: StaticStep | None = None  # a static decode step's device buffers (begin_static_decode)
        self._seq_lens: torch.Tensor | None = torch.zeros(0, dtype=torch.int32)  # None: made on first read
        self._windowed = [g for g in self.groups.values() if g.window is not None]  # blocks fall out of windows

    @property
    def seq_lens(self) -> torch.Tensor:
        """``(S,)`` int32, each of the step's sequences' length with the step's tokens; empty between steps. Made
        on first read (the engine's model calls bring positions: most steps never read it)."""
        if self._seq_lens is None:
            assert self._step is not None
            self._seq_lens = torch.tensor([self._lengths[s] for s in self._step[0]], dtype=torch.int32)
        return self._seq_lens

    # ----- engine side (protocol) -----

    def schedule(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        ids, counts = list(seq_ids), list(num_tokens)
        if not ids or len(ids) != len(counts):
            raise UserError(f"schedule: {len(ids)} sequence ids and {len(counts)} token counts; need as many, >= 1")
        if len(set(ids)) != len(ids):
            raise UserError(f"schedule: sequence ids {ids} repeat; each sequence appears once per step")
        if not all(type(count) is int and count > 0 for count in counts):  # the common case in one pass
            for count in counts:
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise UserError(f"schedule: token count {count!r} must be a positive int")
        lengths, last_step = self._lengths, self._last_step
        new = [s for s in ids if s not in lengths]
        if new:
            self._check_slots(len(new))
            for seq in new:
                self._new_sequence(seq)
        windowed = self._windowed
        for seq, count in zip(ids, counts):
            last_step[seq] = lengths[seq]
            for group in windowed:
                self._free_outside_window(group, seq)
            lengths[seq] += count
        self._step, self._written, self._static = (ids, counts), set(), None
        self._memo.clear()
        self._seq_lens = None

    def rollback(self, seq_id: int, k: int) -> None:
        self._check_seq(seq_id, "rollback")
        allowed = self._lengths[seq_id] - self._last_step[seq_id]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= allowed:
            raise UserError(
                f"rollback of {k!r} tokens of sequence {seq_id}: must be an int in 0..{allowed} (its last step's tokens)"
            )
        keep = self._lengths[seq_id] - k
        for index, layer in self.layers.items():  # check every layer can go back before changing any
            if isinstance(layer, _RecurrentLayer) and layer.lengths[seq_id] > keep:
                start, states = layer.history.get(seq_id, (0, {}))
                if not states or start + max(states) != layer.lengths[seq_id]:  # written since by a static step
                    raise UserError(
                        f"rollback of sequence {seq_id}: layer {index}'s last step was a static decode step, which "
                        "keeps no per-token states (speculative steps on recurrent layers run eagerly)"
                    )
                if keep - start not in states:
                    raise UserError(
                        f"rollback of sequence {seq_id} to {keep} tokens: layer {index} set only its final state in "
                        "its last step; set per-token states (per_token=True) to roll back inside a step"
                    )
        for layer in self.layers.values():
            if layer.lengths[seq_id] <= keep:
                continue
            if isinstance(layer, _RecurrentLayer):
                start, states = layer.history[seq_id]
                for name, value in states[keep - start].items():
                    layer.slots_pool[name][layer.slots[seq_id]] = value
                for t in [t for t in states if t > keep - start]:  # the forgotten tokens' states go
                    del states[t]
            layer.lengths[seq_id] = keep
        for group in self.groups.values():
            self._shrink_table(group, seq_id)
        self._lengths[seq_id] = keep
        del self._hashes[seq_id][keep // self.block_size :]
        self._end_step()

    def release(self, seq_id: int) -> None:
        self._check_seq(seq_id, "release")
        for group in self.groups.values():
            group.pool.give_back([b for b in reversed(group.tables.pop(seq_id)) if b >= 0])
        slot = self._slots.pop(seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        for layer in self.layers.values():
            if isinstance(layer, _RecurrentLayer):
                layer.history.pop(seq_id, None)
            del layer.lengths[seq_id]
        del self._lengths[seq_id], self._last_step[seq_id], self._hashes[seq_id]
        self._end_step()

    def free_blocks(self, layer_index: int) -> int:
        layer = self._layer(layer_index, "free_blocks")
        if isinstance(layer, _RecurrentLayer):
            return len(layer.free)
        return layer.group.pool.num_free()

    # ----- block side (protocol) -----

    def append(self, layer_index: int, key: torch.Tensor, value: torch.Tensor | None) -> None:
        static = self._static  # a static decode step: its rows (padding included), slots precomputed
        ids, counts = ([], []) if static is not None else self._current("append")
        layer = self._layer(layer_index, "append")
        if not isinstance(layer, _AttentionLayer):
            raise UserError(f"append to layer {layer_index}: it keeps recurrent state, use set_recurrent_state")
        self._check_once(layer_index, "append")
        spec = layer.spec
        n = static.rows * static.queries if static is not None else sum(counts)
        _check_tensor(f"layer {layer_index} key", key, (n, spec.kv_heads, spec.head_dim), spec.dtype)
        if spec.value_dim is None:
            if value is not None:
                raise UserError(f"layer {layer_index} keeps a latent cache (value_dim None): pass value=None")
        elif value is None:
            raise UserError(f"layer {layer_index} keeps values of dim {spec.value_dim}: value must not be None")
        else:
            _check_tensor(f"layer {layer_index} value", value, (n, spec.kv_heads, spec.value_dim), spec.dtype)
        if static is None and layer.key_scale is not None and not layer.calibrated:
            calibrate(key, layer.key_scale)  # the layer's first eager append fixes its FP8 scales
            if value is not None and layer.value_scale is not None:
                calibrate(value, layer.value_scale)
            layer.calibrated = True
        if static is not None:  # blocks and lengths were done in begin_static_decode: device work only
            real = static.slots < self.num_blocks * self.block_size if layer.clipped is not None else None
            self._write(layer, static.slots, key, value, real)  # (padding rows write to the scratch block)
            self._written.add(layer_index)
            return
        group, bs = layer.group, self.block_size
        needed = sum(max(0, math.ceil((layer.lengths[s] + c) / bs) - len(group.tables[s])) for s, c in zip(ids, counts))
        if needed > group.pool.num_free():
            raise UserError(
                f"append to layer {layer_index}: needs {needed} more blocks, {group.pool.num_free()} free "
                f"({self.num_blocks} of {bs} tokens): release sequences or schedule fewer tokens"
            )
        starts = tuple(layer.lengths[s] for s in ids)
        memo_key = ("slots", group.window, starts)
        index = self._memo.get(memo_key)  # every layer of the group writes the same slots (unless one sat a step out)
        if index is None:
            if needed:
                self._memo.clear()  # tables grow: block tables gathered before are stale
            slots: list[int] = []  # flat page slot (block * bs + offset) of each new token
            for seq, count, start in zip(ids, counts, starts):
                table = group.tables[seq]
                while len(table) < math.ceil((start + count) / bs):
                    table.append(group.pool.take())  # a token crosses into a new block
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + count))
            index = self._memo[memo_key] = torch.tensor(slots, dtype=torch.int64).to(self.device)
        for seq, count, start in zip(ids, counts, starts):
            layer.lengths[seq] = start + count
        self._write(layer, index, key, value)
        self._written.add(layer_index)

    def _write(
        self,
        layer: _AttentionLayer,
        slots: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Store ``key``/``value`` ``(N, nkv, hd|hdv)`` at flat page slots ``slots (N,)`` (block * bs + offset),
        quantised with the layer's scales when its pages are FP8, saturated values of the rows ``real (N,)`` bool
        (``None``: all) counted. Keys and values into pages of their own dtype take one launch where there is one
        (``kv_store_for``)."""
        store = self._store_kv
        if store is not None and layer.key_scale is None and value is not None and layer.value_pages is not None:
            store(layer.key_pages, layer.value_pages, slots, key, value)
            return
        _store(layer.key_pages, slots, key, layer.key_scale, layer.clipped, real)
        if value is not None and layer.value_pages is not None:
            _store(layer.value_pages, slots, value, layer.value_scale, layer.clipped, real)

    def gather(self, layer_index: int) -> PagedKV:
        static = self._static
        ids, _ = ([], []) if static is not None else self._current("gather")
        layer = self._layer(layer_index, "gather")
        if not isinstance(layer, _AttentionLayer):
            raise UserError(f"gather of layer {layer_index}: it keeps recurrent state, use recurrent_state")
        if static is not None:  # the padded table and lengths of the step's buffers
            return PagedKV(
                key_cache=layer.key_pages,
                value_cache=layer.value_pages,
                block_table=static.block_table,
                seq_lens=static.seq_lens,
                window=layer.spec.window,
            )
        lengths = tuple(layer.lengths[s] for s in ids)
        memo_key = ("table", layer.group.window, lengths)
        memo = self._memo.get(memo_key)  # one block table per group and step, whatever the layer count
        if memo is None:
            tables = [layer.group.tables[s] for s in ids]
            width = max(1, *(len(t) for t in tables))
            table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)  # (S, M)
            lens = torch.tensor(lengths, dtype=torch.int32)
            memo = self._memo[memo_key] = (table.to(self.device), lens.to(self.device))
        table, lens = memo
        return PagedKV(
            key_cache=layer.key_pages,
            value_cache=layer.value_pages,
            block_table=table,
            seq_lens=lens,
            window=layer.spec.window,
        )

    def kv_scales(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """FP8 pages: the layer's dequantisation scales ``(key (nkv,), value (nkv,) or None for a latent cache)``
        fp32, page value times scale = the stored value; ``None`` when the pages are in the model's dtype."""
        layer = self._layer(layer_index, "kv_scales")
        if not isinstance(layer, _AttentionLayer) or layer.key_scale is None:
            return None
        return layer.key_scale, layer.value_scale

    def fp8_clipped(self) -> dict[int, int] | None:
        """FP8 pages: per attention layer, the keys and values its appends saturated at +-448 (beyond ``MARGIN``
        times the calibration chunk's largest) so far; ``None`` when the pages are in the model's dtype. Reads the
        device counters (one host sync)."""
        counters = {i: x.clipped for i, x in self.layers.items() if isinstance(x, _AttentionLayer)}
        if not counters or any(c is None for c in counters.values()):
            return None
        values = torch.stack([c for c in counters.values() if c is not None]).tolist()
        return dict(zip(counters, values, strict=True))

    def recurrent_state(self, layer_index: int) -> dict[str, torch.Tensor]:
        static = self._static
        if static is not None:  # the rows' states gathered by the step's device slot index (padding: scratch)
            layer = self._recurrent(layer_index, "recurrent_state")
            index = self._static_state_index(static)  # (Bp,)
            return {name: pool.index_select(0, index) for name, pool in layer.slots_pool.items()}  # (Bp, *shape)
        ids, _ = self._current("recurrent_state")
        layer = self._recurrent(layer_index, "recurrent_state")
        slots = torch.tensor([layer.slots[s] for s in ids], device=self.device)
        return {name: pool[slots].clone() for name, pool in layer.slots_pool.items()}  # (S, *shape)

    def set_recurrent_state(
        self, layer_index: int, states: Mapping[str, torch.Tensor], *, per_token: bool = False
    ) -> None:
        static = self._static
        ids, counts = ([], []) if static is not None else self._current("set_recurrent_state")
        layer = self._recurrent(layer_index, "set_recurrent_state")
        self._check_once(layer_index, "set_recurrent_state")
        pools = layer.slots_pool  # (the spec's states, as a plain dict: what a traced static step reads)
        if states.keys() != pools.keys():
            raise UserError(f"layer {layer_index} states {sorted(states)}: must be exactly {sorted(pools)}")
        rows = static.rows if static is not None else sum(counts) if per_token else len(ids)
        for name, pool in pools.items():
            _check_tensor(f"layer {layer_index} state {name!r}", states[name], (rows, *pool.shape[1:]), pool.dtype)
        if static is not None:  # one token per row (per-token states are the final ones); lengths: begin_static_decode
            index = self._static_state_index(static)  # (Bp,)
            for name, pool in pools.items():
                pool.index_copy_(0, index, states[name].detach())  # padding rows: the scratch slot
            self._written.add(layer_index)
            return
        first = 0
        for i, (seq, count) in enumerate(zip(ids, counts)):
            slot = layer.slots[seq]
            history = {0: {n: pool[slot].clone() for n, pool in layer.slots_pool.items()}}
            for t in range(1, count + 1):
                if per_token or t == count:
                    row = first + t - 1 if per_token else i
                    history[t] = {n: states[n][row].detach().clone() for n in layer.slots_pool}
            layer.history[seq] = (layer.lengths[seq], history)
            for name, pool in layer.slots_pool.items():
                pool[slot] = history[count][name]
            layer.lengths[seq] += count
            first += count
        self._written.add(layer_index)

    # ----- engine side (beyond the protocol) -----

    @property
    def static_decode_ok(self) -> bool:
        """Whether ``begin_static_decode`` serves this cache: a scratch block (and with recurrent layers a scratch
        state slot), one attention group (full or one window)."""
        return self.scratch_block is not None and len(self.groups) == 1

    @property
    def has_recurrent_state(self) -> bool:
        """Whether some layer keeps recurrent state (a static step of it brings one token per sequence)."""
        return self._has_recurrent

    def static_state_slots(self) -> list[int]:
        """The state slot of each sequence of the step scheduled last (every recurrent layer's), which the caller of
        ``begin_static_decode`` writes into ``step.state_slots`` (the padding rows: ``scratch_state``); empty
        without recurrent layers or a step."""
        if self._step is None or self.scratch_state is None:
            return []
        slots = self._slots
        return [slots[seq] for seq in self._step[0]]

    def begin_static_decode(self, step: StaticStep) -> tuple[list[list[int]], list[int], list[int]]:
        """Run the step scheduled last (``step.queries`` new tokens per sequence: one for decode, ``k + 1`` for a
        speculative verification; at most ``step.rows`` sequences) with static shapes: take the blocks its tokens
        go to, count the tokens in every layer's length, and serve ``append`` and ``gather`` from ``step``'s
        device buffers until the step ends. Returns each sequence's block table, length (with its new tokens)
        and the flat page slots (block * bs + offset) of its new tokens (sequence after sequence), which the
        caller writes into ``step``'s buffers, with the padding rows after them (the scratch block); the tables
        are the cache's own lists (read them now, never change them). With no
        step scheduled: a step of padding rows only (warm-up, graph capture), and empty lists. With recurrent
        layers ``step.state_slots`` holds each row's state slot (``static_state_slots``, then ``scratch_state``):
        one new token per sequence only."""
        if not self.static_decode_ok:
            raise UserError("static decode needs a cache with a scratch block and one attention group")
        if self.scratch_state is not None and (step.queries != 1 or step.state_slots is None):
            raise UserError(
                f"static step of {step.queries} tokens per row on a cache with recurrent layers: static steps of "
                "recurrent layers bring one token per row with a state slot index (speculative steps run eagerly)"
            )
        self._memo.clear()
        self._written = set()
        if self._step is None:
            self._static = step
            return [], [], []
        for layer in self.layers.values():  # real tokens before any eager append: FP8 scales stay at 1 for good
            if isinstance(layer, _AttentionLayer):
                layer.calibrated = True
        ids, counts = self._step
        q = step.queries
        if any(c != q for c in counts) or len(ids) > step.rows:
            raise UserError(
                f"static step of {len(ids)} sequences with {sorted(set(counts))} new tokens in {step.rows} rows: "
                f"{q} new tokens each, at most that many sequences"
            )
        (group,) = self.groups.values()
        bs, pool, all_tables = self.block_size, group.pool, group.tables
        lens = [self._lengths[seq] for seq in ids]  # with the step's tokens
        tables = [all_tables[seq] for seq in ids]
        needed = 0
        for length, table in zip(lens, tables):
            more = -(-length // bs) - len(table)
            if more > 0:
                needed += more
        if needed > pool.num_free():
            raise UserError(
                f"static decode step: needs {needed} more blocks, {pool.num_free()} free ({self.num_blocks} of "
                f"{bs} tokens): release sequences or schedule fewer"
            )
        before = {seq: length - q for seq, length in zip(ids, lens)}
        after = dict(zip(ids, lens))
        for layer in self.layers.values():  # dict views compare and update in C: cheap with many layers
            held = layer.lengths
            assert before.items() <= held.items(), "a layer sat a step out: static steps need every layer"
            held.update(after)
        slots: list[int] = []
        for length, table in zip(lens, tables):
            while len(table) * bs < length:
                table.append(pool.take())  # a token crosses into a new block
            if q == 1:
                slots.append(table[(length - 1) // bs] * bs + (length - 1) % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(length - q, length))
        self._static = step
        return tables, lens, slots

    def end_static_decode(self) -> None:
        """Leave a padding-only static step (``begin_static_decode`` with no step scheduled)."""
        if self._step is None:
            self._static = None

    def start_sequence(self, seq_id: int, token_ids: Sequence[int], extra_key: Hashable = None) -> int:
        """Begin sequence ``seq_id`` (unknown until now) from the cached blocks of the longest cached prefix of
        ``token_ids`` (its tokens known so far) and return how many tokens it starts with: a multiple of the
        block size, below ``len(token_ids)`` so that at least one token is computed. 0 without prefix caching."""
        if seq_id in self._lengths:
            raise UserError(f"start_sequence: sequence {seq_id} already exists")
        self._check_slots(1)
        self._new_sequence(seq_id)
        if not self.prefix_caching or len(token_ids) <= self.block_size:
            return 0
        (group,) = self.groups.values()
        hashes = chain_hashes(token_ids[: len(token_ids) - 1], self.block_size, extra_key)
        snapshots = self.snapshots
        blocks = group.pool.lookup(hashes, None if snapshots is None else snapshots.__contains__)
        cached = len(blocks) * self.block_size
        group.tables[seq_id].extend(blocks)
        if snapshots is not None and blocks:  # the recurrent layers continue from the deepest hit block's states
            for index, states in snapshots.load(hashes[len(blocks) - 1]).items():
                layer = self.layers[index]
                assert isinstance(layer, _RecurrentLayer)
                for name, value in states.items():
                    layer.slots_pool[name][layer.slots[seq_id]].copy_(value)
        for layer in self.layers.values():
            layer.lengths[seq_id] = cached
        self._lengths[seq_id] = self._last_step[seq_id] = cached
        self._hashes[seq_id] = hashes[: len(blocks)]
        return cached

    def cached_prefix_tokens(self, token_ids: Sequence[int], extra_key: Hashable = None) -> int:
        """The tokens ``start_sequence`` would start a new sequence with, changing nothing."""
        if not self.prefix_caching or len(token_ids) <= self.block_size:
            return 0
        (group,) = self.groups.values()
        hashes = chain_hashes(token_ids[: len(token_ids) - 1], self.block_size, extra_key)
        count = group.pool.peek(hashes)
        while self.snapshots is not None and count and hashes[count - 1] not in self.snapshots:
            count -= 1
        return count * self.block_size

    def cache_prefix(self, seq_id: int, token_ids: Sequence[int], extra_key: Hashable = None) -> None:
        """Name the sequence's full blocks (every layer holds their tokens) by their hash chain over
        ``token_ids`` (the sequence's tokens, at least those in the cache), so later requests find them; with
        recurrent layers, snapshot their states when the sequence ends exactly on a named block."""
        hashes = self._hashes.get(seq_id)
        if hashes is None:
            self._check_seq(seq_id, "cache_prefix")
        if not self.prefix_caching:
            return
        if self.snapshots is None and self._lengths[seq_id] // self.block_size <= len(hashes or ()):
            return  # no full block past the named ones (every layer holds at most _lengths tokens): nothing to do
        self._name_blocks(seq_id, token_ids, extra_key)
        snapshots, length = self.snapshots, self._lengths[seq_id]
        if (
            snapshots is None
            or length % self.block_size
            or not 0 < length // self.block_size <= len(self._hashes[seq_id])
        ):
            return
        if any(layer.lengths[seq_id] != length for layer in self.layers.values()):
            return  # a layer sat the step out: the states are not all at the boundary
        h = self._hashes[seq_id][length // self.block_size - 1]
        (group,) = self.groups.values()
        if group.pool.is_cached(h):  # (named just now, or earlier by another sequence)
            states = {}
            for index, layer in self.layers.items():
                if isinstance(layer, _RecurrentLayer):
                    states[index] = {n: pool[layer.slots[seq_id]] for n, pool in layer.slots_pool.items()}
            snapshots.save(h, states)

    def _name_blocks(self, seq_id: int, token_ids: Sequence[int], extra_key: Hashable) -> None:
        """Register the sequence's newly full blocks (held by every attention layer) under their hash chain."""
        (group,) = self.groups.values()
        held = min(self.layers[i].lengths[seq_id] for i in group.layers)
        full = min(held, len(token_ids)) // self.block_size
        hashes = self._hashes[seq_id]
        if full <= len(hashes):
            return
        parent = hashes[-1] if hashes else ROOT_HASH  # continue the chain from the sequence's last named block
        new = []
        for j in range(len(hashes), full):
            parent = block_hash(parent, token_ids[j * self.block_size : (j + 1) * self.block_size], extra_key)
            new.append(parent)
        table = group.tables[seq_id]
        for j, h in enumerate(new, start=len(hashes)):
            group.pool.register(table[j], h)
        hashes.extend(new)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks (in the group that needs most) for ``num_tokens`` more tokens of ``seq_id`` (unknown: a
        new sequence); a sliding window's frees are not counted."""
        blocks = -(-(self._lengths.get(seq_id, 0) + num_tokens) // self.block_size)
        worst = 0
        for group in self.groups.values():
            more = blocks - len(group.tables.get(seq_id, ()))
            if more > worst:
                worst = more
        return worst

    def num_free_blocks(self) -> int:
        """Free blocks of the group with fewest (the number admission goes by)."""
        return min((g.pool.num_free() for g in self.groups.values()), default=self.num_blocks)

    def num_free_slots(self) -> int:
        """Free state slots of the recurrent layer with fewest (``max_seqs`` without recurrent layers)."""
        return min((len(x.free) for x in self.layers.values() if isinstance(x, _RecurrentLayer)), default=self.max_seqs)

    def length(self, seq_id: int) -> int:
        """Tokens sequence ``seq_id`` holds (0 when unknown)."""
        return self._lengths.get(seq_id, 0)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._lengths

    @property
    def prefix_hits(self) -> int:
        """Looked-up full blocks found in the prefix cache (all groups)."""
        return sum(g.pool.hits for g in self.groups.values())

    @property
    def prefix_misses(self) -> int:
        return sum(g.pool.misses for g in self.groups.values())

    def all_free(self) -> bool:
        """No sequence, every block free with reference count zero, every state slot free."""
        blocks = all(
            g.pool.num_free() == self.num_blocks and not any(g.pool.refcounts) and not g.tables
            for g in self.groups.values()
        )
        slots = all(len(x.free) == self.max_seqs for x in self.layers.values() if isinstance(x, _RecurrentLayer))
        snapshots = self.snapshots is None or (
            len(self.snapshots) + self.snapshots.num_free() == self.snapshots.count
            and all(self._hash_cached(h) for h in self.snapshots.hashes())
        )
        return blocks and slots and snapshots and not self._lengths

    @property
    def num_snapshots(self) -> int:
        """Recurrent-state snapshots kept (each belongs to a cached block)."""
        return 0 if self.snapshots is None else len(self.snapshots)

    def _hash_cached(self, h: bytes) -> bool:
        return any(g.pool.is_cached(h) for g in self.groups.values())

    def _forget_snapshot(self, h: bytes) -> None:
        """The block pool forgot hash ``h``: its recurrent-state snapshot goes too."""
        if self.snapshots is not None:
            self.snapshots.forget(h)

    # ----- helpers -----

    def _new_sequence(self, seq: int) -> None:
        self._lengths[seq] = self._last_step[seq] = 0
        self._hashes[seq] = []
        for group in self.groups.values():
            group.tables[seq] = []
        slot = None
        for layer in self.layers.values():
            layer.lengths[seq] = 0
            if isinstance(layer, _RecurrentLayer):
                if slot is None:  # one slot for every recurrent layer
                    slot = self._slots[seq] = self._free_slots.pop()
                for pool in layer.slots_pool.values():
                    pool[slot].zero_()  # a new sequence starts from zero state

    def _check_slots(self, new: int) -> None:
        if new > self.num_free_slots():
            raise UserError(f"schedule: {new} new sequences but {self.num_free_slots()} free state slots")

    def _free_outside_window(self, group: _Group, seq: int) -> None:
        """Give back each block whose tokens all lie ``window`` or more before every layer's length."""
        assert group.window is not None
        table = group.tables[seq]
        length = min(self.layers[i].lengths[seq] for i in group.layers)
        for j, block in enumerate(table):
            if block >= 0 and (j + 1) * self.block_size - 1 <= length - group.window:
                group.pool.give_back([block])
                table[j] = -1

    def _shrink_table(self, group: _Group, seq: int) -> None:
        """After a rollback: give back blocks past the group's longest layer; a kept partial block that is named
        (prefix cache) is made private before anything is written into it again."""
        table = group.tables[seq]
        longest = max(self.layers[i].lengths[seq] for i in group.layers)
        needed = math.ceil(longest / self.block_size)
        group.pool.give_back([b for b in reversed(table[needed:]) if b >= 0])
        del table[needed:]
        if longest % self.block_size == 0 or not table or table[-1] < 0:
            return
        last = table[-1]
        if group.pool.refcounts[last] == 1:
            group.pool.forget(last)
        elif group.pool.has_hash(last) or group.pool.refcounts[last] > 1:  # shared: copy on write
            if group.pool.num_free() == 0:
                raise UserError(f"rollback of sequence {seq}: no free block to copy its shared last block into")
            fresh = group.pool.take()
            for index in group.layers:
                layer = self.layers[index]
                assert isinstance(layer, _AttentionLayer)
                layer.key_pages[fresh] = layer.key_pages[last]
                if layer.value_pages is not None:
                    layer.value_pages[fresh] = layer.value_pages[last]
            group.pool.give_back([last])
            table[-1] = fresh

    def _end_step(self) -> None:
        self._step, self._static = None, None
        self._memo.clear()
        self._seq_lens = torch.zeros(0, dtype=torch.int32)

    def _current(self, what: str) -> tuple[list[int], list[int]]:
        if self._step is None:
            raise UserError(f"{what}: no step scheduled; the engine calls schedule(seq_ids, num_tokens) first")
        return self._step

    def _layer(self, index: int, what: str) -> _AttentionLayer | _RecurrentLayer:
        if index not in self.layers:
            raise UserError(f"{what}: layer {index!r} has no cache spec; layers with one: {sorted(self.layers)}")
        return self.layers[index]

    def _recurrent(self, index: int, what: str) -> _RecurrentLayer:
        layer = self._layer(index, what)
        if not isinstance(layer, _RecurrentLayer):
            raise UserError(f"{what} of layer {index}: it is an attention layer, use append/gather")
        return layer

    def _static_state_index(self, static: StaticStep) -> torch.Tensor:
        """``(Bp,)`` int64: the static step's state slot of each row."""
        if static.state_slots is None:
            raise UserError("static step without a state slot index on a cache with recurrent layers")
        return static.state_slots

    def _check_seq(self, seq_id: int, what: str) -> None:
        if seq_id not in self._lengths:
            raise UserError(f"{what}: unknown sequence {seq_id!r}; known: {sorted(self._lengths)}")

    def _check_once(self, layer_index: int, what: str) -> None:
        if layer_index in self._written:
            raise UserError(f"{what}: layer {layer_index} already stored this step's tokens; once per step")


KVStore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``store(key_pages, value_pages, slots, key, value)``: both rows of a step into their pages' flat slots."""


def kv_store_for(device: torch.device) -> KVStore | None:
    """The one-launch Triton store of keys and values (``triton_store.py``) on CUDA when triton imports; None
    elsewhere (an ``index_copy_`` each, ``_store``)."""
    if device.type != "cuda":
        return None
    try:
        from mcore_inference.triton_store import store_kv_triton
    except ImportError:
        return None
    return store_kv_triton


def _store(
    pages: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor | None,
    clipped: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
) -> None:
    """``pages (P, bs, nkv, d)`` at flat slots ``slots (N,)`` := ``x (N, nkv, d)`` (quantised with ``scale``,
    saturated values of the rows ``real (N,)`` added to ``clipped``)."""
    flat = pages.view(-1, *pages.shape[2:])  # (P * bs, nkv, d)
    if scale is None:
        flat.index_copy_(0, slots, x.detach())
        return
    quantized = quantize(
        x, scale, pages.dtype, clipped=clipped, rows=real
    )  # index_copy_ has no fp8 kernel on the CPU: copy the bytes
    flat.view(torch.uint8).index_copy_(0, slots, quantized.view(torch.uint8))


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
        got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UserError(f"{name}: got {got}, expected {shape} {dtype}")
