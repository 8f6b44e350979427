"""Attention backends of mcore-models: the kernels behind ``BlockContext.attention`` (kind ``"attention"``).

* ``sdpa`` (``sdpa.SDPABackend``): PyTorch's ``scaled_dot_product_attention``; its causal fast path for
  plain rows (cuDNN, then flash, efficient, math on CUDA), a dense boolean mask for packed documents,
  sliding windows and cached keys.
* ``flex`` (``flex.FlexBackend``): FlexAttention with a block-sparse mask built once per call from the
  documents of ``ctx.cu_seqlens`` and the window, so masked blocks cost nothing.
* ``auto`` (``auto.AutoBackend``): the blocks' default: ``flex`` for packed documents or windows on CUDA,
  ``sdpa`` otherwise.

* ``paged`` (``paged.PagedBackend``): under an inference cache (``ctx.kv_cache``), the step's new queries over
  the layer's pages; what blocks fall back to there (the three above decline calls under a cache). Not
  registered: it is no training choice, and an engine brings its own.

``seam.attend`` is what an attention block calls: the context's backend, else the block's default (``paged``
under a cache).
"""
