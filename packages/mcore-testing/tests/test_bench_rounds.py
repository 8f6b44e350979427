"""``mcore_testing.bench.rotated_rounds``: warm-up once, rounds in a rotated order, failures dropped with their error."""

from __future__ import annotations

from collections.abc import Callable

from mcore_testing.bench import rotated_rounds


def test_rounds_rotate_and_a_failing_candidate_drops_out() -> None:
    calls: list[str] = []

    def make(name: str, fail_on: int | None = None) -> Callable[[], int]:
        def run() -> int:
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise RuntimeError(f"{name} broke")
            return calls.count(name)

        return run

    results, errors = rotated_rounds({"a": make("a"), "b": make("b"), "c": make("c", fail_on=3)}, 3)
    # warm-up a b c; round 0: a b c; round 1 (rotated): b c(fails) a; round 2: (c skipped) a b
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "a", "b"]
    assert results == {"a": [2, 3, 4], "b": [2, 3, 4]}
    assert errors == {"c": "RuntimeError('c broke')"}
    results, errors = rotated_rounds({"x": make("x", fail_on=1)}, 2)  # fails in its warm-up: never timed
    assert results == {} and errors == {"x": "RuntimeError('x broke')"}
