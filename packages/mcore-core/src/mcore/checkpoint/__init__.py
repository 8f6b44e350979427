"""Checkpoints: ``torch.distributed.checkpoint`` directories, saved atomically (and in the
background), found again by ``resume = "latest"``, and loaded without unpickling code."""
