"""Point-to-point transfers between pipeline stages: non-blocking sends, receives in the sender's order.

Activations and their gradients change shape with the batch (variable sequence lengths, packed
rows), so every message is a fixed-size header (dims, shape, dtype) followed by the values; the
receiver allocates from the header. Sends are ``isend`` (never waited on until the end of the step:
a rank never blocks on a send, so a schedule runs when its order of computations does, which
``pp_schedule.simulate`` checks). Backends match point-to-point messages between two ranks first in,
first out (NCCL ignores tags). The built-in schedules receive each channel's messages in the order
they are sent (tested); for any other order ``StageComm.recv`` takes the messages of a channel in
the sender's order (``pp_schedule.channel_orders``, known to every rank) and keeps the ones received
early until they are asked for, so a schedule never depends on tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
MAX_DIMS = 6
HEADER = MAX_DIMS + 2  # dims, shape (padded), dtype index

Message = tuple[str, int, int]  # (kind "F" or "B", micro-batch, the stage that produced it)


def header_of(tensor: torch.Tensor) -> torch.Tensor:
    """The int64 header describing ``tensor``: ``[dims, *shape, 0..., dtype index]``."""
    if tensor.dim() > MAX_DIMS or tensor.dtype not in DTYPES:
        raise ValueError(f"pp: cannot send a {tensor.dim()}-d {tensor.dtype} tensor between stages")
    shape = [*tensor.shape, *[0] * (MAX_DIMS - tensor.dim())]
    return torch.tensor([tensor.dim(), *shape, DTYPES.index(tensor.dtype)], dtype=torch.int64)


def empty_from(header: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of the shape and dtype ``header`` describes."""
    dims, *rest = header.tolist()
    return torch.empty(rest[:dims], dtype=DTYPES[rest[MAX_DIMS]], device=device)


class StageComm:
    """One step's transfers of this rank over the ``pp`` group (module docstring).

    ``incoming``: for each peer (a rank of the group), the messages it sends this rank, in its order."""

    def __init__(self, group: Any, rank: int, device: torch.device, incoming: Mapping[int, Sequence[Message]]) -> None:
        self.group, self.rank, self.device = group, rank, device
        self._incoming = {peer: list(msgs) for peer, msgs in incoming.items()}
        self._taken = dict.fromkeys(self._incoming, 0)
        self._early: dict[Message, torch.Tensor] = {}
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def _global(self, peer: int) -> int:
        return dist.get_global_rank(self.group, peer)

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        """Start sending ``tensor`` (detached) to ``peer``; the buffers live until ``wait``."""
        tensor = tensor.detach().contiguous()
        header = header_of(tensor).to(tensor.device)
        for part in (header, tensor):
            self._sends.append((dist.isend(part, self._global(peer), group=self.group), part))

    def recv(self, message: Message, peer: int) -> torch.Tensor:
        """The tensor of ``message`` from ``peer``, receiving the channel's earlier messages first."""
        if message in self._early:
            return self._early.pop(message)
        order = self._incoming.get(peer, [])
        while self._taken.get(peer, 0) < len(order):
            next_message = order[self._taken[peer]]
            self._taken[peer] += 1
            header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, self._global(peer), group=self.group)
            buffer = empty_from(header.cpu(), self.device)
            dist.recv(buffer, self._global(peer), group=self.group)
            if next_message == message:
                return buffer
            self._early[next_message] = buffer
        raise RuntimeError(f"pp: rank {self.rank} waits for {message} that rank {peer} never sends")

    def wait(self) -> None:
        """Finish every send of the step (their buffers may then be freed)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
