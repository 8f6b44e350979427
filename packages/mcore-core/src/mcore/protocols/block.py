"""Model blocks: the layers models are composed of, and the context they share.

Shape legend: B batch rows, T tokens per row, H hidden size, D documents in a packed batch.

A block is an ``nn.Module`` whose forward takes the hidden states and a ``BlockContext``
and returns hidden states of the same shape. Everything a block needs besides its input
(positions, document boundaries, the KV cache, token ids for hash routing, the collector for
auxiliary losses) travels in the context, never in globals. What a call sees is its own: the
context is frozen, the model hands each layer call its own view, and auxiliary losses go to a
per-call collector keyed by (layer, name), so re-running a layer (recompute) changes nothing.
A block never imports ``torch.distributed``: parallel layouts transform blocks from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed import ProcessGroup

    from mcore.mesh import ParallelMesh
    from mcore.protocols.attention import AttentionBackend
    from mcore.protocols.precision import PrecisionRecipe
    from mcore.sequence_split import SequenceSplit


@dataclass(frozen=True, kw_only=True)
class AttentionCacheSpec:
    """What an attention layer caches per token: ``kv_heads`` heads of ``head_dim`` keys and ``value_dim`` values.

    ``value_dim`` ``None`` is a latent cache (MLA): the key holds the compressed latent (``kv_heads`` 1,
    ``head_dim`` = latent + RoPE dims) and there is no value. ``window`` is the layer's sliding window
    (a token sees itself and the ``window - 1`` before it; ``None``: every earlier token): declaring it
    is how the layer lets the engine free the blocks that fell out of it.
    """

    kv_heads: int
    head_dim: int
    value_dim: int | None
    dtype: torch.dtype
    window: int | None = None

    def __post_init__(self) -> None:
        for key in ("kv_heads", "head_dim", "value_dim", "window"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"AttentionCacheSpec.{key} = {value!r}: must be a positive int")


@dataclass(frozen=True, kw_only=True)
class RecurrentStateSpec:
    """What a recurrent layer (GDN, Mamba) keeps per sequence: named state tensors without a token dimension.

    ``states`` maps a name to ``(shape, dtype)``, e.g. ``{"conv": ((channels, kernel - 1), bf16),
    "ssm": ((heads, head_k, head_v), fp32)}``. The engine allocates one slot per sequence from it.
    """

    states: Mapping[str, tuple[tuple[int, ...], torch.dtype]]

    def __post_init__(self) -> None:
        if not self.states:
            raise ValueError("RecurrentStateSpec.states is empty: name at least one state tensor")
        object.__setattr__(self, "states", MappingProxyType({k: (tuple(s), d) for k, (s, d) in self.states.items()}))


LayerCacheSpec = AttentionCacheSpec | RecurrentStateSpec
"""What one layer keeps in the inference cache; the engine builds the cache from ``{layer_index: spec}``."""


@runtime_checkable
class DeclaresCache(Protocol):
    """A block that uses the inference cache says what it keeps (vLLM's per-layer cache spec).

    ``cache_spec()`` is read once, when the engine builds the cache: the engine collects
    ``{layer_index: block.cache_spec()}`` over the model's layers (MTP depths included, under the
    indices ``BlockContext.layer_index`` gives them: after the main stack) and sizes its pools from it.
    """

    def cache_spec(self) -> LayerCacheSpec: ...


@dataclass(frozen=True, kw_only=True)
class PagedKV:
    """One attention layer's cache as ``gather`` returns it: the pages and, per sequence of the step, where they are.

    Shape legend: P blocks in the layer's pool, bs block size, S sequences of the step, M blocks of the
    longest sequence, nkv key/value heads, hd key dim, hdv value dim.

    Attributes:
        key_cache: ``(P, bs, nkv, hd)`` in the spec's dtype.
        value_cache: ``(P, bs, nkv, hdv)``, ``None`` for a latent cache.
        block_table: ``(S, M)`` int32; token ``p`` of the step's sequence ``i`` lies in block
            ``block_table[i, p // bs]`` at offset ``p % bs``. Entries past a sequence's last block, and
            of blocks freed by a sliding window (every token in them at least ``window`` before the
            sequence's end), are ``-1``: no kernel reads them.
        seq_lens: ``(S,)`` int32, this layer's cached length of each of the step's sequences (this
            step's tokens included once the layer has appended them).
        window: the layer's sliding window (``None``: none).
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor | None
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    window: int | None = None


@runtime_checkable
class AttentionKVCache(Protocol):
    """The part of the inference cache an attention block uses: append this step's keys/values, gather the pages.

    * ``seq_lens``: ``(S,)`` int32, the length of each of the step's sequences once this step's tokens
      are in (what positions and sampling need), in the order of ``BlockContext.cu_seqlens``; empty
      between steps (after ``rollback`` or ``release``, before the next ``schedule``).
    * ``append(layer_index, key, value)``: this step's keys/values for layer ``layer_index``, shapes
      ``(N, kv_heads, head_dim)`` and ``(N, kv_heads, value_dim)`` in the layer's spec dtype for the ``N``
      new tokens of the step (flattened, sequence after sequence in the order of ``BlockContext.cu_seqlens``,
      each sequence's tokens in order); a latent cache (MLA) passes ``value`` ``None`` and ``key``
      ``(N, 1, latent_dim)``. Sequence ``i``'s tokens become the layer's positions ``[n, n + c_i)`` after the
      ``n`` it held; a block is taken from the layer's free pool when a token crosses into it, so a
      sequence's tokens may span any number of blocks. A layer appends once per step: a second call
      raises (a re-run layer must not store its tokens twice).
    * ``gather(layer_index)``: the layer's ``PagedKV`` for the step's sequences (this step's tokens
      included once appended), which the attention backend of the same engine reads.

    Wrong shapes, dtypes, token counts, or a layer without an ``AttentionCacheSpec`` raise a one-line
    ``mcore.errors.UserError``.
    """

    @property
    def seq_lens(self) -> torch.Tensor: ...

    def append(self, layer_index: int, key: torch.Tensor, value: torch.Tensor | None) -> None: ...

    def gather(self, layer_index: int) -> PagedKV: ...


@runtime_checkable
class RecurrentStateCache(Protocol):
    """The part of the inference cache a recurrent block (GDN, Mamba) uses: one state slot per sequence.

    The engine allocates each sequence's slot from the layer's ``RecurrentStateSpec`` (zeros) when the
    sequence first appears, and frees it with the sequence; a block never allocates state.

    * ``seq_lens``: as for ``AttentionKVCache``.
    * ``recurrent_state(layer_index)``: ``{name: (S, *shape)}``, the state of each of the step's sequences
      (order of ``BlockContext.cu_seqlens``) after the tokens the layer has already seen; zeros for a new
      sequence. The tensors are copies (changing them changes nothing in the cache).
    * ``set_recurrent_state(layer_index, states, *, per_token=False)``: the state after this step's tokens,
      ``{name: (S, *shape)}``, once per step (it counts as the layer's append: the layer's length grows by
      the step's tokens). With ``per_token=True`` each tensor is ``(N, *shape)``, the state after each of
      the step's ``N`` tokens (flattened as ``append``'s keys); only then can ``KVCacheHandle.rollback``
      restore a state inside the step (speculative decoding), and the last token of each sequence gives
      its state. Wrong names, shapes or dtypes raise a one-line ``UserError``.
    """

    @property
    def seq_lens(self) -> torch.Tensor: ...

    def recurrent_state(self, layer_index: int) -> dict[str, torch.Tensor]: ...

    def set_recurrent_state(
        self, layer_index: int, states: Mapping[str, torch.Tensor], *, per_token: bool = False
    ) -> None: ...


@runtime_checkable
class KVCacheHandle(AttentionKVCache, RecurrentStateCache, Protocol):
    """The inference engine's cache, as a model call sees it: what blocks use plus what the engine drives.

    A model call under a cache (``BlockContext.kv_cache`` set) brings only each sequence's new tokens, packed
    in one row: ``cu_seqlens`` over them, ``positions`` each token's position in its whole sequence. An attention
    block appends the layer's new keys/values (``append``), then hands ``q`` and the new ``k``, ``v`` to
    ``ctx.attention``, the engine's backend, which reads the layer's pages (``gather``): the step's query ``j``
    of sequence ``i`` (``c_i`` new tokens) sits at position ``seq_lens[i] - c_i + j`` and sees the cached keys
    up to it. A latent cache (MLA in its absorbed form) appends ``key (N, 1, latent)`` with no value and hands
    the backend ``v = k[..., :hdv]``: the backend reads values as the first ``hdv`` channels of the keys.

    The engine builds it from ``{layer_index: LayerCacheSpec}`` (``DeclaresCache``); each layer has its
    own pages or state slots, selected by ``BlockContext.layer_index`` (MTP depths continue the main
    stack's numbering, so their cache is just more layers). A block types its use against the narrower
    ``AttentionKVCache`` or ``RecurrentStateCache``; an engine implements all of this one (structurally,
    no base class). One engine step:

    * ``schedule(seq_ids, num_tokens)``: the next model call brings ``num_tokens[i]`` (>= 1) new tokens of
      sequence ``seq_ids[i]`` (distinct ints), in this order, which is the order of
      ``BlockContext.cu_seqlens``. An unknown id starts a new sequence (empty pages, zeroed state slots).
      Then each layer appends (or sets its state) at most once; a layer that sits a step out holds fewer
      tokens and appends after them later. Before the step a sliding-window layer frees every block whose
      tokens all lie ``window`` or more before the layer's length, back to its pool.
    * ``rollback(seq_id, k)``: forget the last ``k`` tokens of a sequence (rejected speculative tokens):
      every layer keeps at most ``length - k`` tokens, pages emptied by it go back to the pool, and each
      recurrent layer's state is the state after the tokens kept (the state before the step, or one of the
      step's per-token states). Afterwards the cache equals one that never had those tokens, so a later
      ``schedule`` appends from there. Only the tokens of the sequence's last step can be rolled back
      (sliding-window and recurrent layers keep nothing older); ``k`` larger than that raises, as does a
      recurrent layer that set only its final state when a rollback ends inside the step. ``rollback``
      and ``release`` end the current step: nothing appends until the next ``schedule``.
    * ``release(seq_id)``: the sequence is finished: its pages and state slots go back to the pools.
    * ``free_blocks(layer_index)``: blocks layer ``layer_index`` can still take (layers sharing one pool
      report the same number; a recurrent layer: free state slots); the engine admits work by it. Running out during ``append`` raises
      ``mcore.errors.UserError`` naming the layer.

    Unknown sequence or layer ids, a ``k`` below 0 or above the tokens of the sequence's last step, and
    wrong shapes raise a one-line ``UserError``.
    """

    def schedule(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> None: ...

    def rollback(self, seq_id: int, k: int) -> None: ...

    def release(self, seq_id: int) -> None: ...

    def free_blocks(self, layer_index: int) -> int: ...


class AuxLosses(Mapping[tuple[int, str], "torch.Tensor"]):
    """The auxiliary losses of one model call: one 0-d tensor per ``(layer_index, name)``.

    The model makes one for each forward call (or uses the one the caller put in the context, to
    read it after the call) and hands it to every layer through that layer's ``BlockContext``
    view; a block adds to it with ``ctx.add_aux_loss(name, loss)``. Adding a key again replaces
    its entry, so a layer re-run during backward (activation recompute), or replayed by a
    schedule, cannot count its loss twice. The model adds the entries to its loss once, after its
    layers. A pipeline stage gives each micro-batch call its own collector.
    """

    def __init__(self) -> None:
        self._losses: dict[tuple[int, str], torch.Tensor] = {}

    def add(self, layer_index: int, name: str, loss: torch.Tensor) -> None:
        """Set the loss ``name`` of layer ``layer_index`` (a 0-d tensor already multiplied by its coefficient)."""
        self._losses[(layer_index, name)] = loss

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        return self._losses[key]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._losses)

    def __len__(self) -> int:
        return len(self._losses)

    def __repr__(self) -> str:
        return f"AuxLosses({sorted(self._losses)})"


#: ``BlockContext.extra`` key of what multi-token prediction reads ahead in the row, set by a layout whose
#: ranks hold parts of each row (``cp``): a tuple with one ``(tokens, labels)`` pair per MTP depth ``d = 1, 2,
#: ...``, each ``(B, T)`` int64 at this call's tokens: the row's token ``d`` places ahead (the row rolled by
#: ``-d``) and depth ``d``'s label (``-100`` past a document's end), computed on the whole row before the split.
#: A model's MTP head uses them when present instead of reading ahead in the tokens it holds.
MTP_AHEAD = "mcore.mtp_ahead"

#: ``BlockContext.extra`` key of the token rows whose logits the caller wants (the inference engine: the last new
#: token of each sequence of the step): ``(R,)`` int64 indices into the call's flattened ``B * T`` tokens. A model
#: called without labels and given it returns logits ``(1, R, V)`` of those rows only (its output projection runs
#: on ``R`` rows, not ``B * T``); without it, ``(B, T, V)``.
LOGIT_ROWS = "mcore.logit_rows"


@dataclass(frozen=True, kw_only=True, eq=False)
class BlockContext:
    """What every block's forward receives besides the hidden states: read-only, one view per call.

    The context is frozen: a block reads it and never changes it (nor the tensors it holds), so a
    layer re-run later (activation recompute, pipeline schedules, CUDA graphs) sees exactly what it
    saw the first time. The model narrows the batch's context into one view per layer call with
    ``ctx.for_layer(index, extra=...)``; other views come from ``dataclasses.replace``. The one
    thing a block writes is the call's ``aux_losses`` collector, through ``add_aux_loss``.

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
        kv_cache: the inference cache handle, ``None`` in training; a block reads and appends
            its own slice, ``layer_index``.
        mesh: the run's ``ParallelMesh``, for blocks whose math depends on a parallel
            dimension (a layout may also pass per-dimension info in ``extra``).
        layer_index: index of the layer this view was made for (``for_layer``); layers after
            the model's main stack (MTP depths) continue the numbering. ``0`` for a block called
            alone.
        aux_losses: the call's ``AuxLosses`` collector, shared by every view of one call and
            never by two calls. ``None`` until the model makes one for the call; a caller
            that wants to read the losses passes a fresh one with each call.
        extra: read-only map of per-call values a model threads through its blocks (mHC
            residual streams, MTP's next-token embeddings). Keys are namespaced by the plugin
            that uses them; the model passes new values by making a new view, never by writing.
        attention: the ``AttentionBackend`` attention blocks hand their ``q, k, v`` to (a layout's
            ring attention, the engine's paged attention, the run's ``train.attention``);
            ``None``: each block's own default.
        precision: the run's ``PrecisionRecipe`` (set by the run loop), for blocks whose GEMMs the
            recipe may take over without the block importing the recipe's plugin (MoE experts:
            ``mcore.precision.grouped.grouped_linear``); ``None``: plain GEMMs.
        head_group: the ranks that hold the other heads of every layer (tensor parallelism, set by
            the layout that splits heads); ``None``: this rank holds all of them. A tensor every
            head reads but that is computed before the heads split (MLA's shared rope key) goes
            through ``share_across_heads``.
        loss_group: the ranks that hold parts of this micro-batch (a ``BatchShardingLayout``'s
            ``loss_group()``, set by the run loop); ``None``: this call holds all of it. The loss
            divides its sum by ``label_count``, so the ranks' losses add up to the batch mean.
        sequence_split: set by a layout that splits rows by tokens (``cp``): a ``mcore.sequence_split.
            SequenceSplit`` whose all-to-all gives a recurrent block (``supports_sequence_split``) every token
            of the full rows for its share of the heads, and the full rows' ``positions``/``cu_seqlens``
            (this view's are the local tokens'); ``None``: this call holds whole rows.
    """

    positions: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    token_ids: torch.Tensor | None = None
    kv_cache: KVCacheHandle | None = None
    mesh: ParallelMesh | None = None
    layer_index: int = 0
    aux_losses: AuxLosses | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    attention: AttentionBackend | None = None
    precision: PrecisionRecipe | None = None
    head_group: ProcessGroup | None = None
    loss_group: ProcessGroup | None = None
    sequence_split: SequenceSplit | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))  # our own copy, read-only

    def __reduce__(self) -> tuple[Any, ...]:  # copy/pickle: the read-only view of ``extra`` cannot be pickled
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return (partial(BlockContext, **{**values, "extra": dict(self.extra)}), ())

    def for_layer(self, index: int, *, extra: Mapping[str, Any] | None = None) -> BlockContext:
        """The view a model gives its layer ``index``: this view with ``extra`` added to its map."""
        return replace(self, layer_index=index, extra={**self.extra, **extra} if extra else self.extra)

    def share_across_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` unchanged, with its gradient summed over ``head_group`` in backward: each rank's
        heads give part of the gradient of a tensor all heads read (identity without a group)."""
        if self.head_group is None:
            return tensor
        from mcore.tp_regions import sum_grad_over

        return sum_grad_over(tensor, self.head_group)

    def label_count(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` (a 0-d count of this call's non-ignored labels) summed over ``loss_group``: what a
        loss divides its sum by, at least 1 (a batch without labels gives a zero loss, not nan)."""
        total = local.detach().float()
        if self.loss_group is not None:
            import torch.distributed as dist

            total = total.clone()
            dist.all_reduce(total, group=self.loss_group)
        return total.clamp(min=1)

    def loss_group_size(self) -> int:
        """Ranks of ``loss_group`` (1 without one). Auxiliary losses are computed per rank on its part of
        the micro-batch; a model adds each divided by this, so the group's losses sum to their mean."""
        if self.loss_group is None:
            return 1
        import torch.distributed as dist

        return int(dist.get_world_size(self.loss_group))

    def add_aux_loss(self, name: str, loss: torch.Tensor) -> None:
        """Record this layer's auxiliary loss ``name`` (0-d, already scaled); a re-run replaces it."""
        if self.aux_losses is None:
            raise RuntimeError(
                f"auxiliary loss {name!r} has no collector: a model gives each call one; to call a block alone "
                "pass BlockContext(aux_losses=AuxLosses())"
            )
        self.aux_losses.add(self.layer_index, name, loss)


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


@dataclass(frozen=True, kw_only=True)
class BlockShared:
    """Values the model decides for every block, passed explicitly (never matched by field name).

    A block's own settings come from its ``Config`` (its ``[model.<block>]`` table); these come
    from the model: the residual width, the layer count, the init std of input projections and
    of output projections (the model scales the latter, e.g. ``init_std / sqrt(2 * layers)``),
    the muP width multiplier (``None``: muP off) and the index of the layer the block belongs to.
    """

    hidden_size: int
    num_layers: int = 1
    init_std: float = 0.02
    output_init_std: float | None = None
    mup_width_mult: float | None = None
    layer_index: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"hidden_size = {self.hidden_size!r}: must be a positive int")
        if self.num_layers < 1:
            raise ValueError(f"num_layers = {self.num_layers!r}: must be a positive int")

    @property
    def out_std(self) -> float:
        """Std of output projections (``output_init_std``, else ``init_std``)."""
        return self.init_std if self.output_init_std is None else self.output_init_std


def sequence_state_blocks(model: nn.Module) -> list[str]:
    """Paths of ``model``'s modules whose class says ``carries_sequence_state = True`` (``ModelBlock``)."""
    return [path for path, module in model.named_modules() if getattr(type(module), "carries_sequence_state", False)]


@runtime_checkable
class ModelBlock(Protocol):
    """A layer of a model, registered under kind ``"block"``.

    Contract:
        * ``forward(hidden, ctx)``: ``hidden`` is ``(B, T, H)`` in the compute dtype; the
          result has the same shape and dtype. Residual connections are the model's job
          unless the block's documentation says otherwise. The block leaves ``ctx`` and the
          tensors in it unchanged (it may be called again with the same view: recompute); its
          only write is ``ctx.add_aux_loss(name, loss)``.
        * ``num_parameters()``: parameters owned by the block (before any sharding).
        * ``flops(shape)``: forward FLOPs for ``shape`` (multiply-add counts 2); backward is
          taken as twice the forward by MFU accounting.
        * ``reset_parameters(generator)``: re-initialise from ``generator`` so a seed
          reproduces the weights exactly.
        * optional ``cache_spec() -> LayerCacheSpec`` (``DeclaresCache``): what the inference
          cache keeps for this layer (attention keys/values and their sliding window, or
          recurrent state), read by the engine to build its ``KVCacheHandle``.
        * optional class attribute ``carries_sequence_state = True``: the block runs a state along
          the whole sequence (a recurrent mixer: GDN, Mamba), so each rank must see a document's
          tokens in order; a layout that splits sequences over ranks refuses it unless it passes
          that state (``sequence_state_blocks``). With ``supports_sequence_split = True`` too, the block
          reads ``ctx.sequence_split`` when set (its whole sequence for a share of its heads, by all-to-all),
          so such a layout may run it.
        * Blocks are constructed by their factory from a typed ``Config`` (a keyword-only
          dataclass attribute of the registered class; its ``[model.<block>]`` table) plus
          ``hidden_size`` and, when the constructor takes it, ``shared`` (a ``BlockShared``:
          layer count, init stds, muP multiplier, layer index, passed explicitly by the model).
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
    (mean over non-ignored tokens, auxiliary losses included). The model calls each layer with
    its own view ``ctx.for_layer(index)``, makes an ``AuxLosses`` collector for the call unless
    ``ctx.aux_losses`` brings one, and adds the collector's losses to the loss once, after its
    layers. ``block_lookup(kind_name)``
    resolves block names through the registry, so a block from another plugin slots in by
    name. ``flops_per_token(config, seq_len)`` gives the training FLOPs per token (forward and
    backward) that MFU uses; the run loop passes ``block_lookup=`` too when it takes one.

    Optional, each read where it exists: ``hf_family(config)`` names the registered Hugging Face
    family (kind ``"hf"``, ``mcore.hf``) ``mcore export`` writes (the older ``export_hf(model,
    config, out_dir)`` still works); presets are registered under kind ``"preset"``
    (``mcore.presets``; the older ``presets()`` mapping is still read); a ``Config`` with a
    ``blocks`` field and ``block_names()`` gets one ``[model.<block>]`` table per block,
    ``check_blocks(config, block_lookup=)`` checks what needs the blocks and ``moved_keys`` points
    keys of an older schema to their tables (``mcore.config.model``). Optional ``check_run(config, run)``: rules across sections (e.g. ``train.seq_len`` against
    the model's longest sequence), called by ``resolve_config`` once every section is resolved;
    it raises ``ValueError`` naming the keys (any selected implementation may define it).

    Optional ``supports_meta_init = True`` (a class attribute) promises meta-device construction:
    ``build(config, seed=seed, device="meta", block_lookup=...)`` returns the model with every
    parameter and buffer on the meta device, drawing no values (so it costs no memory and little
    time), and ``mcore.construct.init_params`` can initialise every parameter after the layouts
    have sharded it: each parameter declares ``init`` in a ``param_specs()`` (``ParamSpec(role,
    init=Init("normal", std=0.02))``, see ``mcore.params``; required for anything a layout
    shards), or else a module above it has ``reset_parameters(generator)`` that sets it while it
    is whole; a module with buffers defines ``reset_buffers()``, which recomputes them once they
    are allocated. ``mcore.train.build`` then builds on meta and each rank allocates and fills
    only its own part, with values that do not depend on the layouts or the world size. Without
    it (or when a chosen layout does not declare ``supports_meta_init``), ``build`` is called with
    the mesh's device and must return the initialised model.
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
