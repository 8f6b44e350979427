"""Checkpoints: ``torch.distributed.checkpoint`` directories, saved atomically (and in the
background) with a ``manifest.json`` of per-file checksums written last, found again by
``resume = "latest"``, and loaded without unpickling code, without opening files outside the
checkpoint and only after their checksums match.

``store`` saves, lists and prunes; ``load`` loads; ``manifest`` writes and verifies the
checksums; ``safe_reader`` and ``confine`` keep a crafted checkpoint from running code or
reading other files; ``finite`` refuses to save ``inf``/``nan`` state; ``state`` splits
optimizer state into tensors and JSON; ``agree`` makes every rank reach the same verdict.
"""
