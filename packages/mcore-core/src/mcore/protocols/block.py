"""Model blocks: the layers models are composed of, and the context they share.

Shape legend: B batch rows, T tokens per row, H hidden size, D documents in a packed batch.

A block is an ``nn.Module`` whose forward takes the hidden states and a ``BlockContext``
and returns hidden states of the same shape. Everything a block needs besides its input
(positions, document boundaries, the KV cache, token ids for hash routing, collectors for
auxiliary losses) travels in the context, never in globals. A block never imports
``torch.distributed``: parallel layouts transform blocks from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mcore.mesh import ParallelMesh


@runtime_checkable
class KVCacheHandle(Protocol):
    """A view of an inference KV cache that an attention-like block reads and appends to.

    The inference engine owns the storage (paged blocks, prefix cache); a block sees only
    this handle. ``layer_index`` selects the block's own slice of the cache.

    * ``append(layer_index, key, value)``: store this step's keys/values, shapes
      ``(N, kv_heads, head_dim)`` for the ``N`` new tokens of the batch (flattened, in the
      order of ``BlockContext.cu_seqlens``); for latent caches (MLA) ``value`` may be
      ``None`` and ``key`` holds the compressed latent ``(N, 1, latent_dim)``.
    * ``gather(layer_index)``: keys/values visible to each new token, in whatever layout
      the engine's attention kernel expects, returned as an opaque object that the
      attention backend registered with the same engine understands.
    * ``seq_lens``: ``(S,)`` int32, total cached length of each sequence after append.
    """

    seq_lens: torch.Tensor

    def append(self, layer_index: int, key: torch.Tensor, value: torch.Tensor | None) -> None: ...

    def gather(self, layer_index: int) -> Any: ...


@dataclass(kw_only=True)
class BlockContext:
    """What every block's forward receives besides the hidden states.

    Attributes:
        positions: ``(B, T)`` int64 position of each token inside its own document. For
            packed rows (THD) positions restart at 0 at each document start, so rotary
            embeddings see per-document positions.
        cu_seqlens: ``(D + 1,)`` int32 cumulative document lengths over the flattened
            ``B * T`` tokens, starting at 0 and ending at ``B * T``. ``None`` means every
            row is one document (causal over the row). When set, no token attends across a
            document boundary and no recurrent state (GDN, Mamba) crosses one.
        max_seqlen: longest document in ``cu_seqlens`` (a host int, so kernels need no sync).
        token_ids: ``(B, T)`` int64 input ids, for blocks that route by token (hash MoE).
        kv_cache: the inference cache handle, ``None`` in training.
        mesh: the run's ``ParallelMesh``, for blocks whose math depends on a parallel
            dimension (a layout may also stash per-dimension info in ``extra``).
        layer_index: index of the block in its model (set by the model for each block).
        aux_losses: collector the block appends scalar auxiliary losses to (MoE load
            balancing, z-loss); the model adds them to the loss. Each entry is
            ``(name, loss)`` with ``loss`` a 0-d tensor already multiplied by its coefficient.
        extra: open map for state that a model threads through its blocks (mHC residual
            streams, MTP hidden states). Keys are namespaced by the plugin that uses them.
    """

    positions: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    token_ids: torch.Tensor | None = None
    kv_cache: KVCacheHandle | None = None
    mesh: ParallelMesh | None = None
    layer_index: int = 0
    aux_losses: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FlopsShape:
    """The work a forward pass is asked to do, for FLOP counting.

    ``tokens`` is the number of tokens processed (``B * T``); ``attended`` is the number of
    (query, key) pairs that attention actually scores summed over the batch (for a causal
    row of length T it is ``T * (T + 1) / 2``; with documents, the sum over documents;
    with a sliding window of W, at most ``T * W``). Attention blocks use ``attended``;
    everything else uses ``tokens``.
    """

    tokens: int
    attended: int


@runtime_checkable
class ModelBlock(Protocol):
    """A layer of a model, registered under kind ``"block"``.

    Contract:
        * ``forward(hidden, ctx)``: ``hidden`` is ``(B, T, H)`` in the compute dtype; the
          result has the same shape and dtype. Residual connections are the model's job
          unless the block's documentation says otherwise.
        * ``num_parameters()``: parameters owned by the block (before any sharding).
        * ``flops(shape)``: forward FLOPs for ``shape`` (multiply-add counts 2); backward is
          taken as twice the forward by MFU accounting.
        * ``reset_parameters(generator)``: re-initialise from ``generator`` so a seed
          reproduces the weights exactly.
        * Blocks are constructed by their factory from a typed ``Config`` (a keyword-only
          dataclass attribute of the registered class) plus the model's ``hidden_size``.
    """

    def __call__(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor: ...

    def num_parameters(self) -> int: ...

    def flops(self, shape: FlopsShape) -> int: ...

    def reset_parameters(self, generator: torch.Generator | None = None) -> None: ...


@runtime_checkable
class ModelFactory(Protocol):
    """A model, registered under kind ``"model"`` (``gpt``, ``hybrid``, ...).

    The registered object has a ``Config`` dataclass (the ``[model]`` section's schema,
    including ``preset``) and ``build(config, *, seed, device, block_lookup)`` returning an
    ``nn.Module`` whose ``forward(tokens, *, labels=None, ctx=None)`` returns logits
    ``(B, T, V)`` or, given labels ``(B, T)`` int64 with ``-100`` ignored, a 0-d fp32 loss
    (mean over non-ignored tokens, auxiliary losses included). ``block_lookup(kind_name)``
    resolves block names through the registry, so a block from another plugin slots in by
    name. ``flops_per_token(seq_len)`` gives the training FLOPs per token (forward and
    backward) that MFU uses; ``hf`` (optional) names the Hugging Face mapping.
    Optional ``check_run(config, run)``: rules across sections (e.g. ``train.seq_len`` against
    the model's longest sequence), called by ``resolve_config`` once every section is resolved;
    it raises ``ValueError`` naming the keys (any selected implementation may define it).
    """

    @property
    def Config(self) -> type:
        """The ``[model]`` section's schema: a keyword-only dataclass."""
        ...

    def build(
        self,
        config: Any,
        *,
        seed: int,
        device: torch.device | str,
        block_lookup: Callable[[str], Any],
    ) -> nn.Module: ...

    def flops_per_token(self, config: Any, seq_len: int) -> int: ...

    def presets(self) -> Mapping[str, Mapping[str, Any]]: ...
