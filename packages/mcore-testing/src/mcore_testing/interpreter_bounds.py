"""Out-of-bounds checks for Triton kernels run in Triton's CPU interpreter.

Why it exists: on a GPU a masked load or store that reaches past its tensor is an illegal memory access (or,
worse, silently reads a neighbour's bytes), but Triton's interpreter runs it on host memory and usually gets away
with it, so a kernel can pass every CPU test and crash on the card. ``install()`` makes the interpreter check every
address a kernel loads or stores with its mask on against the storages of the tensors passed to that launch, and
raise ``OutOfBounds`` naming the kernel, the access and how far outside it reached. (An access that lands inside
another argument of the same launch passes: the check knows where tensors are, not which one a pointer meant.) ``mcore_testing.interpreted``
installs it in every child process it starts. A kernel that reaches tensors through a table of pointers (not its
own arguments: the multi-tensor AdamW) names them with ``allowed(*tensors)`` around its launches.

It wraps two pieces of the interpreter (``GridExecutor._init_args_hst``: the launch's host copies of its
arguments; ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` / ``create_atomic_rmw``), found by feature detection;
``install()`` raises ``RuntimeError`` naming what is missing if a Triton release renames them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class OutOfBounds(RuntimeError):
    """A masked-on address of a load or store lies outside every tensor argument of the launch."""


class _Launch:
    """The byte ranges ``[start, end)`` of the launch being interpreted and its kernel's name."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.kernel = "?"
        self.extra: list[tuple[int, int]] = []  # what ``allowed`` adds: tensors a kernel reaches through tables


def _check(launch: _Launch, ptrs: Any, mask: Any, itemsize: int, what: str) -> None:
    """Raise ``OutOfBounds`` if an address of ``ptrs`` with ``mask`` on is not ``itemsize`` bytes inside a range."""
    addresses = np.asarray(ptrs.data).astype(np.uint64).ravel()
    on = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
    addresses = addresses[on]
    if addresses.size == 0:
        return
    inside = np.zeros(addresses.shape, dtype=bool)
    for start, end in launch.ranges + launch.extra:
        inside |= (addresses >= start) & (addresses + itemsize <= end)
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    nearest = min(launch.ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=(0, 0))
    raise OutOfBounds(
        f"kernel {launch.kernel}: {int((~inside).sum())} of {addresses.size} masked-on {what} addresses lie outside "
        f"its tensor arguments (the first at byte offset {bad - nearest[0]} of the nearest, {nearest[1] - nearest[0]} "
        "bytes long)"
    )


def install() -> None:
    """Check every masked load and store of every kernel the interpreter runs from now on (idempotent)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreter_bounds.install: TRITON_INTERPRET=1 must be set before Triton is imported")
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    np_dtype: Any = getattr(interpreter, "_get_np_dtype", None)
    needed: dict[str, Any] = {
        "GridExecutor._init_args_hst": getattr(executor, "_init_args_hst", None),
        "InterpreterBuilder.create_masked_load": getattr(builder, "create_masked_load", None),
        "InterpreterBuilder.create_masked_store": getattr(builder, "create_masked_store", None),
        "_get_np_dtype": np_dtype,
    }
    missing = [name for name, found in needed.items() if found is None]
    if missing:
        raise RuntimeError(f"interpreter_bounds: this Triton's interpreter has no {', '.join(missing)}")
    if isinstance(getattr(executor, "_mcore_bounds", None), _Launch):
        return
    launch = _Launch()
    init_args, load, store = (
        needed["GridExecutor._init_args_hst"],
        needed["InterpreterBuilder.create_masked_load"],
        needed["InterpreterBuilder.create_masked_store"],
    )

    def init_args_checked(self: Any, args_dev: Any, kwargs: Any) -> Any:
        args_host, kwargs_host = init_args(self, args_dev, kwargs)
        launch.ranges = []
        for arg in [*args_host, *kwargs_host.values()]:
            if isinstance(arg, torch.Tensor):
                launch.ranges.append(_byte_range(arg))
        launch.kernel = getattr(self.fn, "__name__", "?")
        return args_host, kwargs_host

    def itemsize(ptrs: Any) -> int:
        return int(np.dtype(np_dtype(ptrs.get_element_ty())).itemsize)

    def load_checked(self: Any, ptrs: Any, mask: Any, *rest: Any) -> Any:
        _check(launch, ptrs, mask, itemsize(ptrs), "load")
        return load(self, ptrs, mask, *rest)

    def store_checked(self: Any, ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
        _check(launch, ptrs, mask, itemsize(ptrs), "store")
        return store(self, ptrs, value, mask, *rest)

    atomic = getattr(builder, "create_atomic_rmw", None)  # tl.atomic_add and friends: (op, ptr, val, mask, ...)
    if atomic is not None:

        def atomic_checked(self: Any, op: Any, ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
            _check(launch, ptrs, mask, itemsize(ptrs), "atomic")
            return atomic(self, op, ptrs, value, mask, *rest)

        builder.create_atomic_rmw = atomic_checked  # type: ignore[union-attr]
    executor._init_args_hst = init_args_checked  # type: ignore[union-attr]
    builder.create_masked_load = load_checked  # type: ignore[union-attr]
    builder.create_masked_store = store_checked  # type: ignore[union-attr]
    executor._mcore_bounds = launch  # type: ignore[union-attr]


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


@contextmanager
def allowed(*tensors: torch.Tensor | None) -> Iterator[None]:
    """While inside, launches may also reach ``tensors`` (``None`` skipped): those a kernel finds through a table
    of addresses rather than as arguments. Needs ``install()`` first."""
    from triton.runtime import interpreter

    launch = getattr(getattr(interpreter, "GridExecutor", None), "_mcore_bounds", None)
    if not isinstance(launch, _Launch):
        raise RuntimeError("interpreter_bounds.allowed: call install() first")
    before = len(launch.extra)
    launch.extra.extend(_byte_range(t) for t in tensors if t is not None)
    try:
        yield
    finally:
        del launch.extra[before:]
