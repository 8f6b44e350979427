"""The inference engine as ``mcore generate`` sees it: built from a loaded model, asked for token ids.

The core's ``generate`` command re-runs the whole window for every new token; an installed engine
(the inference plugin, with a paged KV cache) does the same job fast. The command cannot import a
plugin, so the engine is registered under kind ``"engine"`` and reached by name, and this protocol
is all the command relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn


@runtime_checkable
class GenerationEngine(Protocol):
    """Registered under kind ``"engine"``; ``mcore generate`` uses it when one is installed.

    Contract:
        * ``from_model(model, *, tokenizer, max_model_len)`` (a classmethod): an engine over an already
          loaded model (eval mode, on its device, single process); ``tokenizer`` is the run's
          ``mcore.data.tokenizer`` object (or ``None``), ``max_model_len`` the longest sequence
          (prompt plus new tokens) the engine must serve. ``None`` when the engine cannot serve this
          model (e.g. no block declares a cache): the command then keeps its plain loop.
        * ``generate_ids(prompts, *, max_new_tokens, temperature, top_k, seed, stop_token_ids)``: for each
          prompt (token ids) its new token ids, at most ``max_new_tokens``, ending early after a token of
          ``stop_token_ids`` (kept in the output). ``temperature <= 0`` and ``top_k <= 0`` is greedy, and
          greedy output equals the argmax of the full-sequence forward at every step; sampling is
          reproducible for a ``seed``. Bad values raise a one-line ``mcore.errors.UserError``.
    """

    name: ClassVar[str]

    @classmethod
    def from_model(cls, model: nn.Module, *, tokenizer: Any, max_model_len: int) -> GenerationEngine | None: ...

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]: ...
