"""Split nested state dicts into tensors (for DCP) and a JSON skeleton (for everything else).

An optimizer's or precision recipe's ``state_dict()`` mixes tensors with ints, floats,
strings and lists. Tensors go to ``torch.distributed.checkpoint`` under flat keys
(``optimizer/state/layers.0.w/exp_avg``); the rest is kept as JSON, with each tensor replaced
by ``{"__tensor__": key}``. Nothing is pickled, so nothing is unpickled on load.
"""

from __future__ import annotations

from typing import Any

import torch

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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
