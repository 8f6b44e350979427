"""``no_grad``: ``torch.no_grad()`` as a decorator that costs nothing when gradients are already off.

Why it exists: ``@torch.no_grad()`` builds a context manager on every call (about 5 us on the host), and the
engine's decode step called several such functions (step, the static decoder's run, the sampler) nested in one
another: host time per decode step during which the GPU idles. This decorator checks the grad mode first and
only enters ``torch.no_grad()`` when gradients are on (a direct call from user code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def no_grad(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with gradients off (entering ``torch.no_grad()`` only when they are on)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
