"""Training data: tokenizers, document sources, token shards, packing and sampling.

The modules here import no ``torch`` (numpy only), so the tokenization workers that
``mcore data prepare`` and the run start stay light; ``mcore.data.pipeline`` turns rows
into tensors for the run loop.
"""
