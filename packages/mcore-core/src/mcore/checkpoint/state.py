"""Split nested state dicts into tensors (for DCP) and a JSON skeleton (for everything else).

An optimizer's or precision recipe's ``state_dict()`` mixes tensors with ints, floats,
strings and lists. Tensors go to ``torch.distributed.checkpoint`` under flat keys
(``optimizer/state/layers.0.w/exp_avg``); the rest is kept as JSON, with each tensor replaced
by ``{"__tensor__": key}``. Nothing is pickled, so nothing is unpickled on load.
"""

from __future__ import annotations

from typing import Any

import torch

from mcore.errors import UserError

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def split_state(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)`` with ``tensors`` keyed by ``prefix/path``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {_DICT: [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint {type(value).__name__} at {path!r}: only tensors and JSON values")

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_state``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_DICT}:
            return {k: join_state(v, tensors) for k, v in skeleton[_DICT]}
        if set(skeleton) == {_TUPLE}:
            return tuple(join_state(v, tensors) for v in skeleton[_TUPLE])
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


def tensor_keys(skeleton: Any) -> list[str]:
    """The tensor keys a skeleton refers to."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if set(node) == {_TENSOR}:
                out.append(node[_TENSOR])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(skeleton)
    return out


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states as JSON-able lists of bytes."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: Any, *, source: str = "the checkpoint's rank_XXXXX.json") -> None:
    """Restore what ``rng_state`` saved, after checking it (read from a file anyone may have edited): an object
    whose ``cpu`` (and ``cuda``, when restored) is a list of bytes as long as this torch's state."""
    cpu = _rng_bytes(state, "cpu", len(torch.get_rng_state()), source)
    cuda = None
    if isinstance(state, dict) and "cuda" in state and torch.cuda.is_available():
        cuda = _rng_bytes(state, "cuda", len(torch.cuda.get_rng_state()), source)
    try:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise _rng_error(source, f"torch refused it: {first[0] if first else type(exc).__name__}") from None


def _rng_bytes(state: Any, key: str, length: int, source: str) -> torch.Tensor:
    value = state.get(key) if isinstance(state, dict) else None
    if (
        not isinstance(value, list)
        or len(value) != length
        or not all(type(b) is int and 0 <= b <= 255 for b in value)  # a bool is not a byte
    ):
        raise _rng_error(source, f"'{key}' must be a list of {length} ints in 0..255")
    return torch.tensor(value, dtype=torch.uint8)


def _rng_error(source: str, why: str) -> UserError:
    return UserError(f"{source}: its 'rng' state is malformed ({why}); use another checkpoint")
