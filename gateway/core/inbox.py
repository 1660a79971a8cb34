"""Theory of operation: instant inbox rules.

Each accepted message gets a store-wide increasing sequence number. A device reads
its inbox with a cursor (the last seq it has handled) and acknowledges up to a seq,
which is SUCCESSFUL DELIVERY for every message up to it. A resend with the same
(sender, message id) maps to the stored message (exactly once); with another body it
is a conflict. A message whose ttl runs out before delivery fails as EXPIRED and the
sender is told through its delivery records.
"""

from __future__ import annotations

from collections.abc import Sequence

from .codec import batch_size_of
from .model import InstantMessage, QueuedMessage

# Observe notifications are never split block-wise (aiocoap #177): an inbox batch that
# rides on a notification stays within one datagram.
NOTIFICATION_BUDGET = 900
BATCH_OVERHEAD = 16


def expires_at(message: InstantMessage, received: int) -> int | None:
    return None if message.ttl is None else received + message.ttl


def fit_batch(
    messages: Sequence[QueuedMessage], budget: int, *, at_least_one: bool
) -> tuple[list[QueuedMessage], bool]:
    """The longest prefix of ``messages`` whose encoded batch fits ``budget`` bytes.

    A fetch (``at_least_one``) always returns the first message, so a single large
    message is still delivered, by block-wise transfer. A notification cannot be
    block-wise (aiocoap #177): it may carry no message and only say ``more``."""
    out: list[QueuedMessage] = []
    used = BATCH_OVERHEAD
    for msg in messages:
        size = batch_size_of(msg)
        if used + size > budget and (out or not at_least_one):
            return out, True
        out.append(msg)
        used += size
    return out, False
