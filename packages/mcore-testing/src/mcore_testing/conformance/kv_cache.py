"""Conformance checks for ``KVCacheHandle`` implementations (an inference engine's cache).

The suite plays the engine and the blocks: it schedules steps, appends random keys/values and sets
random recurrent states, keeps what it stored in plain lists, and reads every attention layer back
through ``gather``'s ``PagedKV`` (block table into the pages) to compare. Layer specs are the suite's;
``make_cache`` builds the implementation's cache over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from mcore.errors import UserError
from mcore.protocols import (
    AttentionCacheSpec,
    AttentionKVCache,
    BlockContext,
    KVCacheHandle,
    LayerCacheSpec,
    PagedKV,
    RecurrentStateCache,
    RecurrentStateSpec,
)

_F32 = torch.float32
GQA = AttentionCacheSpec(kv_heads=2, head_dim=4, value_dim=3, dtype=_F32)
LATENT = AttentionCacheSpec(kv_heads=1, head_dim=6, value_dim=None, dtype=_F32)  # MLA: key only
RECURRENT = RecurrentStateSpec(states={"conv": ((3, 2), _F32), "ssm": ((2, 2, 2), _F32)})


def read_layer(paged: PagedKV, row: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens ``[start, seq_lens[row])`` of the step's sequence ``row``, through the block table:
    keys ``(L, nkv, hd)`` and values ``(L, nkv, hdv)`` (``None`` for a latent cache)."""
    bs = paged.key_cache.shape[1]
    length = int(paged.seq_lens[row])
    keys, values = [], []
    for pos in range(start, length):
        block = int(paged.block_table[row, pos // bs])
        assert block >= 0, f"token {pos} of step row {row} (length {length}) lies in a freed block (-1)"
        keys.append(paged.key_cache[block, pos % bs])
        if paged.value_cache is not None:
            values.append(paged.value_cache[block, pos % bs])
    key = torch.stack(keys) if keys else paged.key_cache.new_zeros(0, *paged.key_cache.shape[2:])
    if paged.value_cache is None:
        return key, None
    value = torch.stack(values) if values else paged.value_cache.new_zeros(0, *paged.value_cache.shape[2:])
    return key, value


class _Driver:
    """The engine and the blocks: drives a cache step by step and remembers what every layer should hold."""

    def __init__(self, cache: Any, specs: Mapping[int, LayerCacheSpec], seed: int, per_token: bool = True) -> None:
        self.cache, self.specs, self.per_token = cache, specs, per_token
        self.gen = torch.Generator().manual_seed(seed)
        self.kv: dict[int, dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]]] = {i: {} for i in specs}
        # layer -> seq -> the state after each token (None where only a step's final state was set)
        self.states: dict[int, dict[int, list[dict[str, torch.Tensor] | None]]] = {i: {} for i in specs}

    def rand(self, *shape: int, dtype: torch.dtype = _F32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(dtype)

    def step(self, ids: Sequence[int], counts: Sequence[int], *, layers: Sequence[int] | None = None) -> None:
        self.cache.schedule(list(ids), list(counts))
        n = sum(counts)
        for index in self.specs if layers is None else layers:
            spec = self.specs[index]
            if isinstance(spec, AttentionCacheSpec):
                key = self.rand(n, spec.kv_heads, spec.head_dim, dtype=spec.dtype)
                value = (
                    None if spec.value_dim is None else self.rand(n, spec.kv_heads, spec.value_dim, dtype=spec.dtype)
                )
                self.cache.append(index, key, value)
                row = 0
                for seq, count in zip(ids, counts):
                    for r in range(row, row + count):
                        self.kv[index].setdefault(seq, []).append((key[r], None if value is None else value[r]))
                    row += count
            else:
                assert isinstance(spec, RecurrentStateSpec)
                self.check_state(index, ids)
                rows = n if self.per_token else len(ids)
                states = {name: self.rand(rows, *shape, dtype=dtype) for name, (shape, dtype) in spec.states.items()}
                self.cache.set_recurrent_state(index, states, per_token=self.per_token)
                row = 0
                for i, (seq, count) in enumerate(zip(ids, counts)):
                    history = self.states[index].setdefault(seq, [])
                    for t in range(count):
                        pick = row + t if self.per_token else i
                        last = t == count - 1
                        history.append(
                            {name: v[pick] for name, v in states.items()} if self.per_token or last else None
                        )
                    row += count

    def check_state(self, index: int, ids: Sequence[int]) -> None:
        """``recurrent_state`` gives each sequence the state after its last token (zeros when new)."""
        got = self.cache.recurrent_state(index)
        spec = self.specs[index]
        assert isinstance(spec, RecurrentStateSpec)
        for name, (shape, dtype) in spec.states.items():
            assert got[name].shape == (len(ids), *shape) and got[name].dtype == dtype, (
                f"layer {index}: recurrent_state {name!r} is {tuple(got[name].shape)} {got[name].dtype}, "
                f"expected {(len(ids), *shape)} {dtype}"
            )
        for row, seq in enumerate(ids):
            history = self.states[index].get(seq, [])
            want = history[-1] if history else {n: torch.zeros(s, dtype=d) for n, (s, d) in spec.states.items()}
            if want is None:
                continue
            for name in spec.states:
                assert torch.equal(got[name][row], want[name]), (
                    f"layer {index} sequence {seq}: state {name!r} is not the state after its last kept token"
                )

    def forget(self, seq: int, k: int) -> None:
        """What ``rollback(seq, k)`` must leave: the lists without their last ``k`` tokens."""
        for kv in self.kv.values():
            if seq in kv and k:
                del kv[seq][-k:]
        for states in self.states.values():
            if seq in states and k:
                del states[seq][-k:]

    def release(self, seq: int) -> None:
        """Release the sequence in the cache and forget it here."""
        self.cache.release(seq)
        for kv in self.kv.values():
            kv.pop(seq, None)
        for states in self.states.values():
            states.pop(seq, None)

    def check(self, ids: Sequence[int]) -> None:
        """Every attention layer of the current step holds exactly what was appended, in order (a sliding-window
        layer: its last ``window`` tokens)."""
        for index, spec in self.specs.items():
            if not isinstance(spec, AttentionCacheSpec):
                continue
            paged = self.cache.gather(index)
            assert paged.block_table.dtype == torch.int32 and paged.seq_lens.dtype == torch.int32
            assert paged.block_table.shape[0] == len(ids), f"layer {index}: block table rows != step sequences"
            assert paged.key_cache.shape[2:] == (spec.kv_heads, spec.head_dim), f"layer {index} key_cache shape"
            assert (paged.value_cache is None) == (spec.value_dim is None), f"layer {index} value_cache presence"
            for row, seq in enumerate(ids):
                want = self.kv[index].get(seq, [])
                assert int(paged.seq_lens[row]) == len(want), (
                    f"layer {index} sequence {seq}: gather seq_lens {int(paged.seq_lens[row])}, {len(want)} appended"
                )
                start = 0 if spec.window is None else max(0, len(want) - spec.window)
                key, value = read_layer(paged, row, start)
                assert torch.equal(key, torch.stack([k for k, _ in want[start:]]) if want[start:] else key), (
                    f"layer {index} sequence {seq}: keys from gather differ from those appended"
                )
                if value is not None:
                    assert torch.equal(value, torch.stack([v for _, v in want[start:]])), (  # type: ignore[misc]
                        f"layer {index} sequence {seq}: values from gather differ from those appended"
                    )


class KVCacheConformance:
    """Subclass and implement ``make_cache(specs, *, block_size, num_blocks, max_seqs)``: a ``KVCacheHandle``
    over ``{layer_index: LayerCacheSpec}`` with (at least) ``num_blocks`` blocks of ``block_size`` tokens per
    attention layer and ``max_seqs`` state slots per recurrent layer.

    Class attributes: ``block_size``, ``num_blocks``, ``max_seqs`` passed to ``make_cache``.
    """

    block_size: int = 4
    num_blocks: int = 24
    max_seqs: int = 4

    def make_cache(
        self, specs: Mapping[int, LayerCacheSpec], *, block_size: int, num_blocks: int, max_seqs: int
    ) -> Any:
        raise NotImplementedError("subclass must implement make_cache(specs, *, block_size, num_blocks, max_seqs)")

    def _cache(self, specs: Mapping[int, LayerCacheSpec], num_blocks: int | None = None) -> Any:
        return self.make_cache(
            specs,
            block_size=self.block_size,
            num_blocks=self.num_blocks if num_blocks is None else num_blocks,
            max_seqs=self.max_seqs,
        )

    def _specs(self) -> dict[int, LayerCacheSpec]:
        """A hybrid stack: attention, recurrent, latent (MLA), windowed attention."""
        window = AttentionCacheSpec(kv_heads=2, head_dim=4, value_dim=4, dtype=_F32, window=self.block_size + 1)
        return {0: GQA, 1: RECURRENT, 2: LATENT, 3: window}

    def test_is_kv_cache_handle(self) -> None:
        cache = self._cache(self._specs())
        for protocol in (KVCacheHandle, AttentionKVCache, RecurrentStateCache):
            assert isinstance(cache, protocol), (
                f"make_cache returned a {type(cache).__name__}, not a {protocol.__name__}"
            )

    def test_append_gather_in_order_across_blocks_and_sequences(self) -> None:
        bs = self.block_size
        driver = _Driver(self._cache({0: GQA, 2: LATENT}), {0: GQA, 2: LATENT}, seed=1)
        driver.step([7, 3, 5], [bs + 3, 1, 2 * bs + 1])  # prefill: crosses 1, 0 and 2 block boundaries
        driver.check([7, 3, 5])
        for step in range(bs + 1):  # decode, one token each, with a sequence joining and the order changing
            ids = [5, 7, 3] if step % 2 else [3, 5, 7, 9]
            driver.step(ids, [1] * len(ids))
            driver.check(ids)
        driver.step([9, 3], [2 * bs, bs - 1])  # a chunk that fills whole blocks
        driver.check([9, 3])

    def test_seq_lens_follow_the_schedule(self) -> None:
        cache = self._cache({0: GQA})
        driver = _Driver(cache, {0: GQA}, seed=2)
        driver.step([1, 2], [5, 3])
        lens = cache.seq_lens
        assert isinstance(lens, torch.Tensor) and lens.dtype == torch.int32, "seq_lens must be an int32 tensor"
        assert lens.tolist() == [5, 3], f"seq_lens after the first step {lens.tolist()}, expected [5, 3]"
        driver.step([2, 1], [1, 2])
        assert cache.seq_lens.tolist() == [4, 7], f"seq_lens {cache.seq_lens.tolist()}, expected [4, 7] (step order)"
        cache.rollback(1, 1)
        driver.forget(1, 1)
        driver.step([1], [1])
        assert cache.seq_lens.tolist() == [7], (
            f"seq_lens after rollback of 1 and one new token: {cache.seq_lens.tolist()}"
        )

    def test_rollback_then_reappend_equals_never_appended(self) -> None:
        bs = self.block_size
        specs = self._specs()
        drafted, plain = self._cache(specs), self._cache(specs)
        a, b = _Driver(drafted, specs, seed=3), _Driver(plain, specs, seed=3)
        prefill = [bs - 1, 2 * bs]
        a.step([0, 1], prefill)
        b.step([0, 1], prefill)
        free_before = {i: drafted.free_blocks(i) for i in specs}
        a.step([0, 1], [bs + 2, 3])  # speculative: bs + 2 and 3 draft tokens, crossing block boundaries
        drafted.rollback(0, bs + 1)  # keep 1
        drafted.rollback(1, 3)  # keep none
        a.forget(0, bs + 1)
        a.forget(1, 3)
        for i, spec in specs.items():
            if isinstance(spec, AttentionCacheSpec) and spec.window is None:
                assert drafted.free_blocks(i) == free_before[i], (
                    f"layer {i}: rollback did not return the emptied blocks ({free_before[i]} free before the draft "
                    f"step, {drafted.free_blocks(i)} after rolling it back)"
                )
        # the plain cache gets the kept token the same way, with the same values
        kept = {i: {s: list(v) for s, v in a.kv[i].items()} for i in specs}
        plain.schedule([0], [1])
        for i, spec in specs.items():
            if isinstance(spec, AttentionCacheSpec):
                key, value = kept[i][0][-1]
                plain.append(i, key[None], None if value is None else value[None])
                b.kv[i][0].append((key, value))
            else:
                ref = a.states[i][0][-1]  # the draft step's state after its first token
                assert ref is not None
                b.check_state(i, [0])
                plain.set_recurrent_state(i, {n: t[None] for n, t in ref.items()})
                b.states[i][0].append(ref)
        for driver in (a, b):
            driver.gen = torch.Generator().manual_seed(33)
            driver.step([1, 0], [2, 1])  # then both go on identically
            driver.check([1, 0])
        assert drafted.seq_lens.tolist() == plain.seq_lens.tolist() == [2 * bs + 2, bs + 1], (
            f"seq_lens after rollback and re-append {drafted.seq_lens.tolist()}, never appended {plain.seq_lens.tolist()}"
        )
        for i, spec in specs.items():
            if isinstance(spec, RecurrentStateSpec):
                got, want = drafted.recurrent_state(i), plain.recurrent_state(i)
                for name in spec.states:
                    assert torch.equal(got[name], want[name]), (
                        f"layer {i} state {name!r}: rollback then re-append differs"
                    )
            else:
                ga, gb = drafted.gather(i), plain.gather(i)
                assert ga.seq_lens.tolist() == gb.seq_lens.tolist(), f"layer {i}: gather seq_lens differ after rollback"
                for row in range(2):
                    start = 0 if spec.window is None else max(0, int(gb.seq_lens[row]) - spec.window)
                    for x, y in zip(read_layer(ga, row, start), read_layer(gb, row, start)):
                        assert (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)), (
                            f"layer {i} row {row}: tokens after rollback then re-append differ from never appending"
                        )

    def test_sliding_window_frees_blocks_and_keeps_the_window(self) -> None:
        bs, window = self.block_size, self.block_size + 2
        spec = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=_F32, window=window)
        pool = 4 + window // bs
        cache = self._cache({0: spec}, num_blocks=pool)
        driver = _Driver(cache, {0: spec}, seed=4)
        driver.step([0], [window])
        steps = 3 * pool * bs  # far more tokens than the pool holds: only freed blocks make room
        for step in range(steps):
            count = 1 + step % 3
            before = len(driver.kv[0][0])
            driver.step([0], [count])
            driver.check([0])  # the last `window` tokens read back
            paged = cache.gather(0)
            for j in range(paged.block_table.shape[1]):
                if (j + 1) * bs - 1 <= before - window:
                    assert int(paged.block_table[0, j]) == -1, (
                        f"block {j} (tokens {j * bs}..{(j + 1) * bs - 1}) is wholly {window} or more before the "
                        f"length {before} but was not freed"
                    )
        held = pool - cache.free_blocks(0)
        assert held <= (window + 3) // bs + 2, f"window layer holds {held} blocks for a window of {window}"
        cache.release(0)
        assert cache.free_blocks(0) == pool, f"after release {cache.free_blocks(0)} of {pool} blocks are free"

    def test_recurrent_state_slots_are_per_sequence_and_persist(self) -> None:
        specs: dict[int, LayerCacheSpec] = {0: RECURRENT, 1: GQA}
        cache = self.make_cache(specs, block_size=self.block_size, num_blocks=self.num_blocks, max_seqs=2)
        driver = _Driver(cache, specs, seed=5, per_token=False)
        driver.step([4, 8], [3, 2])  # new sequences read zeros (the driver checks every read)
        driver.step([8], [1])  # sequence 4 is not scheduled: its state waits
        cache.schedule([4, 8], [1, 1])
        cache.recurrent_state(0)["ssm"].fill_(7.0)  # the block's copy: the cache must not see this
        driver.check_state(0, [4, 8])  # each its own, 4's from two steps ago
        driver.step([8, 4], [2, 1], layers=[1])  # layer 0 does not run this step: states unchanged
        driver.step([4, 8], [1, 1])
        driver.release(4)
        driver.step([5, 8], [1, 1])  # 5 takes the slot 4 left: it starts from zero, 8 keeps its state

    def test_mtp_layers_after_the_main_stack(self) -> None:
        num_layers, depths = 2, 2
        mtp_indices = [BlockContext().for_layer(num_layers + k - 1).layer_index for k in range(1, depths + 1)]
        specs: dict[int, LayerCacheSpec] = {i: GQA for i in range(num_layers)}
        specs |= {i: LATENT for i in mtp_indices}
        cache = self._cache(specs)
        driver = _Driver(cache, specs, seed=6)
        driver.step([0, 1], [self.block_size + 1, 2])
        driver.step([1, 0], [1, 1])
        driver.check([1, 0])
        keys = [read_layer(cache.gather(i), 0)[0] for i in specs]
        assert all(not torch.equal(keys[0], k) for k in keys[1:]), "MTP layers share the main stack's cache"

    def test_running_out_of_blocks_raises(self) -> None:
        cache = self._cache({0: GQA}, num_blocks=2)
        cache.schedule([0], [2 * self.block_size + 1])
        with pytest.raises(UserError) as info:
            cache.append(0, torch.zeros(2 * self.block_size + 1, 2, 4), torch.zeros(2 * self.block_size + 1, 2, 3))
        assert "\n" not in str(info.value), f"error is not one line: {info.value}"

    def test_bad_input_raises_one_line_user_error(self) -> None:
        specs = self._specs()
        cache = self._cache(specs)
        driver = _Driver(cache, specs, seed=7, per_token=False)
        driver.step([0], [3])
        driver.step([0], [2])
        k, v = torch.zeros(2, 2, 4), torch.zeros(2, 2, 3)
        bad: dict[str, Callable[[], Any]] = {
            "rollback more than the last step": lambda: cache.rollback(0, 3),
            "rollback of a negative count": lambda: cache.rollback(0, -1),
            "rollback of an unknown sequence": lambda: cache.rollback(42, 1),
            "release of an unknown sequence": lambda: cache.release(42),
            "rollback inside a step of a final-state-only recurrent layer": lambda: cache.rollback(0, 1),
            "schedule with repeated ids": lambda: cache.schedule([1, 1], [1, 1]),
            "schedule of zero tokens": lambda: cache.schedule([1], [0]),
            "schedule with mismatched lists": lambda: cache.schedule([1, 2], [1]),
        }
        for what, call in bad.items():
            self._raises(what, call)
        cache.schedule([0, 1], [1, 1])
        more: dict[str, Callable[[], Any]] = {
            "append with a wrong key shape": lambda: cache.append(0, torch.zeros(2, 2, 5), v),
            "append with a wrong token count": lambda: cache.append(0, torch.zeros(3, 2, 4), torch.zeros(3, 2, 3)),
            "append with a wrong dtype": lambda: cache.append(0, k.double(), v.double()),
            "append without values to a layer with values": lambda: cache.append(0, k, None),
            "append with values to a latent layer": lambda: cache.append(2, torch.zeros(2, 1, 6), v),
            "append to an unknown layer": lambda: cache.append(9, k, v),
            "gather of an unknown layer": lambda: cache.gather(9),
            "append to a recurrent layer": lambda: cache.append(1, k, v),
            "set_recurrent_state with a missing state": lambda: cache.set_recurrent_state(
                1, {"conv": torch.zeros(2, 3, 2)}
            ),
            "set_recurrent_state with a wrong shape": lambda: cache.set_recurrent_state(
                1, {"conv": torch.zeros(2, 3, 3), "ssm": torch.zeros(2, 2, 2, 2)}
            ),
        }
        for what, call in more.items():
            self._raises(what, call)
        cache.append(0, k, v)
        self._raises("a second append of the same layer in one step", lambda: cache.append(0, k, v))

    @staticmethod
    def _raises(what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except UserError as error:
            assert "\n" not in str(error), f"{what}: the error is not one line: {error}"
            return
        except Exception as error:  # any other type is the failure reported
            raise AssertionError(
                f"{what}: raised {type(error).__name__}, not mcore.errors.UserError: {error}"
            ) from None
        raise AssertionError(f"{what}: no error raised")
