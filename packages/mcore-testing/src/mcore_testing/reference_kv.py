"""``ReferenceKVCache``: the ``KVCacheHandle`` contract in plain PyTorch, small enough to read in one sitting.

It exists so the conformance suite (``mcore_testing.conformance.KVCacheConformance``) has a known-good
implementation to run against, and so a reader sees the contract as code: per attention layer a pool of
fixed-size blocks, a free list and a block table per sequence; per recurrent layer a pool of state slots
(one per sequence, zeroed when a sequence takes it). CPU or any device; nothing here is fast.

Shape legend: P blocks per layer, bs block size, nkv heads, hd key dim, hdv value dim, S sequences of the
step, N new tokens of the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mcore.errors import UserError
from mcore.protocols.block import AttentionCacheSpec, LayerCacheSpec, PagedKV, RecurrentStateSpec


@dataclass
class _AttentionLayer:
    spec: AttentionCacheSpec
    key_pool: torch.Tensor  # (P, bs, nkv, hd)
    value_pool: torch.Tensor | None  # (P, bs, nkv, hdv)
    free: list[int]  # block ids, taken from the end
    tables: dict[int, list[int]] = field(default_factory=dict)  # seq -> block per bs tokens, -1 once freed
    lengths: dict[int, int] = field(default_factory=dict)


@dataclass
class _RecurrentLayer:
    spec: RecurrentStateSpec
    pools: dict[str, torch.Tensor]  # name -> (max_seqs, *shape)
    free: list[int]  # slot ids
    slots: dict[int, int] = field(default_factory=dict)  # seq -> slot
    lengths: dict[int, int] = field(default_factory=dict)
    # seq -> (layer length before its last write, {tokens into that write: state}) for rollback
    history: dict[int, tuple[int, dict[int, dict[str, torch.Tensor]]]] = field(default_factory=dict)


class ReferenceKVCache:
    """A ``KVCacheHandle`` over ``{layer_index: spec}``: ``num_blocks`` blocks of ``block_size`` tokens per
    attention layer, ``max_seqs`` state slots per recurrent layer."""

    def __init__(
        self,
        specs: Mapping[int, LayerCacheSpec],
        *,
        block_size: int = 16,
        num_blocks: int = 64,
        max_seqs: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        for key, value in (("block_size", block_size), ("num_blocks", num_blocks), ("max_seqs", max_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"ReferenceKVCache {key} = {value!r}: must be a positive int")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layers: dict[int, _AttentionLayer | _RecurrentLayer] = {}
        for index, spec in specs.items():
            if isinstance(spec, AttentionCacheSpec):
                shape = (num_blocks, block_size, spec.kv_heads)
                values = None
                if spec.value_dim is not None:
                    values = torch.zeros(*shape, spec.value_dim, dtype=spec.dtype, device=device)
                keys = torch.zeros(*shape, spec.head_dim, dtype=spec.dtype, device=device)
                self.layers[index] = _AttentionLayer(spec, keys, values, list(range(num_blocks - 1, -1, -1)))
            elif isinstance(spec, RecurrentStateSpec):
                pools = {n: torch.zeros(max_seqs, *s, dtype=d, device=device) for n, (s, d) in spec.states.items()}
                self.layers[index] = _RecurrentLayer(spec, pools, list(range(max_seqs - 1, -1, -1)))
            else:
                raise UserError(
                    f"layer {index}: cache spec {spec!r} is not an AttentionCacheSpec or RecurrentStateSpec"
                )
        self._lengths: dict[int, int] = {}  # seq -> length (the longest any layer may hold)
        self._last_step: dict[int, int] = {}  # seq -> its length before its last step (rollback floor)
        self._step: tuple[list[int], list[int]] | None = None  # (seq ids, new tokens) of the current step
        self._written: set[int] = set()  # layers that appended (or set state) in the current step

    # ----- engine side -----

    def schedule(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        ids, counts = list(seq_ids), list(num_tokens)
        if not ids or len(ids) != len(counts):
            raise UserError(f"schedule: {len(ids)} sequence ids and {len(counts)} token counts; need as many, >= 1")
        if len(set(ids)) != len(ids):
            raise UserError(f"schedule: sequence ids {ids} repeat; each sequence appears once per step")
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise UserError(f"schedule: token count {count!r} must be a positive int")
        new = [s for s in ids if s not in self._lengths]
        for layer in self.layers.values():
            if isinstance(layer, _RecurrentLayer) and len(new) > len(layer.free):
                raise UserError(f"schedule: {len(new)} new sequences but {len(layer.free)} free state slots")
        for seq in new:
            self._lengths[seq] = 0
            for layer in self.layers.values():
                if isinstance(layer, _AttentionLayer):
                    layer.tables[seq], layer.lengths[seq] = [], 0
                else:
                    slot = layer.slots[seq] = layer.free.pop()
                    for pool in layer.pools.values():
                        pool[slot].zero_()  # a new sequence starts from zero state
                    layer.lengths[seq] = 0
        for seq in ids:
            self._last_step[seq] = self._lengths[seq]
            for layer in self.layers.values():
                if isinstance(layer, _AttentionLayer) and layer.spec.window is not None:
                    self._free_outside_window(layer, seq)
        for seq, count in zip(ids, counts):
            self._lengths[seq] += count
        self._step, self._written = (ids, counts), set()

    def rollback(self, seq_id: int, k: int) -> None:
        self._check_seq(seq_id, "rollback")
        allowed = self._lengths[seq_id] - self._last_step[seq_id]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= allowed:
            raise UserError(
                f"rollback of {k!r} tokens of sequence {seq_id}: must be an int in 0..{allowed} (the tokens of its last step)"
            )
        keep = self._lengths[seq_id] - k
        for index, layer in self.layers.items():  # check every layer can go back before changing any
            if isinstance(layer, _RecurrentLayer) and layer.lengths[seq_id] > keep:
                start, states = layer.history[seq_id]
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
                    layer.pools[name][layer.slots[seq_id]] = value
            else:
                table = layer.tables[seq_id]
                needed = math.ceil(keep / self.block_size)
                layer.free.extend(b for b in reversed(table[needed:]) if b >= 0)
                del table[needed:]
            layer.lengths[seq_id] = keep
        self._lengths[seq_id] = keep
        self._step = None

    def release(self, seq_id: int) -> None:
        self._check_seq(seq_id, "release")
        for layer in self.layers.values():
            if isinstance(layer, _AttentionLayer):
                layer.free.extend(b for b in reversed(layer.tables.pop(seq_id)) if b >= 0)
            else:
                layer.free.append(layer.slots.pop(seq_id))
                layer.history.pop(seq_id, None)
            del layer.lengths[seq_id]
        del self._lengths[seq_id], self._last_step[seq_id]
        self._step = None

    def free_blocks(self, layer_index: int) -> int:
        return len(self._layer(layer_index, "free_blocks").free)

    # ----- block side -----

    @property
    def seq_lens(self) -> torch.Tensor:
        ids = [] if self._step is None else self._step[0]  # between steps: no sequences
        return torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32)

    def append(self, layer_index: int, key: torch.Tensor, value: torch.Tensor | None) -> None:
        ids, counts = self._current("append")
        layer = self._layer(layer_index, "append")
        if not isinstance(layer, _AttentionLayer):
            raise UserError(f"append to layer {layer_index}: it keeps recurrent state, use set_recurrent_state")
        self._check_once(layer_index, "append")
        spec, n = layer.spec, sum(counts)
        self._check_tensor(f"layer {layer_index} key", key, (n, spec.kv_heads, spec.head_dim), spec.dtype)
        if spec.value_dim is None:
            if value is not None:
                raise UserError(f"layer {layer_index} keeps a latent cache (value_dim None): pass value=None")
        elif value is None:
            raise UserError(f"layer {layer_index} keeps values of dim {spec.value_dim}: value must not be None")
        else:
            self._check_tensor(f"layer {layer_index} value", value, (n, spec.kv_heads, spec.value_dim), spec.dtype)
        bs = self.block_size
        needed = sum(
            math.ceil((layer.lengths[s] + c) / bs) - len(layer.tables[s]) for s, c in zip(ids, counts)
        )  # new blocks, all taken before anything is written
        if needed > len(layer.free):
            raise UserError(
                f"append to layer {layer_index}: needs {needed} more blocks, {len(layer.free)} free "
                f"({self.num_blocks} of {bs} tokens): release sequences or schedule fewer tokens"
            )
        row = 0
        for seq, count in zip(ids, counts):
            table, start = layer.tables[seq], layer.lengths[seq]
            for pos in range(start, start + count):
                if pos // bs == len(table):
                    table.append(layer.free.pop())  # a token crosses into a new block
                layer.key_pool[table[pos // bs], pos % bs] = key[row]
                if value is not None and layer.value_pool is not None:
                    layer.value_pool[table[pos // bs], pos % bs] = value[row]
                row += 1
            layer.lengths[seq] = start + count
        self._written.add(layer_index)

    def gather(self, layer_index: int) -> PagedKV:
        ids, _ = self._current("gather")
        layer = self._layer(layer_index, "gather")
        if not isinstance(layer, _AttentionLayer):
            raise UserError(f"gather of layer {layer_index}: it keeps recurrent state, use recurrent_state")
        width = max(1, *(len(layer.tables[s]) for s in ids))
        table = torch.full((len(ids), width), -1, dtype=torch.int32)  # (S, M)
        for i, seq in enumerate(ids):
            table[i, : len(layer.tables[seq])] = torch.tensor(layer.tables[seq], dtype=torch.int32)
        lens = torch.tensor([layer.lengths[s] for s in ids], dtype=torch.int32)
        return PagedKV(
            key_cache=layer.key_pool,
            value_cache=layer.value_pool,
            block_table=table.to(layer.key_pool.device),
            seq_lens=lens.to(layer.key_pool.device),
            window=layer.spec.window,
        )

    def recurrent_state(self, layer_index: int) -> dict[str, torch.Tensor]:
        ids, _ = self._current("recurrent_state")
        layer = self._recurrent(layer_index, "recurrent_state")
        slots = torch.tensor([layer.slots[s] for s in ids])
        return {name: pool[slots.to(pool.device)].clone() for name, pool in layer.pools.items()}  # (S, *shape)

    def set_recurrent_state(
        self, layer_index: int, states: Mapping[str, torch.Tensor], *, per_token: bool = False
    ) -> None:
        ids, counts = self._current("set_recurrent_state")
        layer = self._recurrent(layer_index, "set_recurrent_state")
        self._check_once(layer_index, "set_recurrent_state")
        if set(states) != set(layer.spec.states):
            raise UserError(f"layer {layer_index} states {sorted(states)}: must be exactly {sorted(layer.spec.states)}")
        rows = sum(counts) if per_token else len(ids)
        for name, (shape, dtype) in layer.spec.states.items():
            self._check_tensor(f"layer {layer_index} state {name!r}", states[name], (rows, *shape), dtype)
        first = 0
        for seq, count in zip(ids, counts):
            slot = layer.slots[seq]
            history = {0: {n: pool[slot].clone() for n, pool in layer.pools.items()}}
            for t in range(1, count + 1):
                if per_token or t == count:
                    row = first + t - 1 if per_token else ids.index(seq)
                    history[t] = {n: states[n][row].detach().clone() for n in layer.pools}
            layer.history[seq] = (layer.lengths[seq], history)
            for name, pool in layer.pools.items():
                pool[slot] = history[count][name]
            layer.lengths[seq] += count
            first += count
        self._written.add(layer_index)

    # ----- helpers -----

    def _free_outside_window(self, layer: _AttentionLayer, seq: int) -> None:
        """Free each block whose tokens all lie ``window`` or more before the layer's length."""
        assert layer.spec.window is not None
        table, length = layer.tables[seq], layer.lengths[seq]
        for j, block in enumerate(table):
            if block >= 0 and (j + 1) * self.block_size - 1 <= length - layer.spec.window:
                layer.free.append(block)
                table[j] = -1

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

    def _check_seq(self, seq_id: int, what: str) -> None:
        if seq_id not in self._lengths:
            raise UserError(f"{what}: unknown sequence {seq_id!r}; known: {sorted(self._lengths)}")

    def _check_once(self, layer_index: int, what: str) -> None:
        if layer_index in self._written:
            raise UserError(f"{what}: layer {layer_index} already stored this step's tokens; once per step")

    @staticmethod
    def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{name}: got {got}, expected {shape} {dtype}")
