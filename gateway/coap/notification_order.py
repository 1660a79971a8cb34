"""Replayed OSCORE notifications are not news (RFC 8613 section 7.4.1).

aiocoap 0.4.17's client does not check that the notifications of an observation come
in Partial IV order. It applies only RFC 7641's reordering rule on the Observe number,
which takes any notification as news once 128 s passed since the last one. So a
recorded notification, re-sent under a new message id after a quiet spell, was
delivered as if the presentity had just changed back. Every OSCORE context a client
uses notes the Partial IV on what it unprotects, and the notifications of each
observation pass through :func:`fresh_notifications`, which drops any not above the
highest seen. Used by devices (``device_sim/client.py``) and by the gateway's own
observations at peer gateways (``gateway/federation.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiocoap import Message
from aiocoap.oscore import COSE_PIV, CanUnprotect


def remember_partial_ivs(credentials: Any) -> int:
    """Make each OSCORE context among ``credentials`` (a client's credentials map) set
    ``partial_iv`` on what it unprotects: the sender's sequence number as an int, or
    None when a response reused its request's nonce. Returns how many it changed."""
    installed = 0
    for item in credentials.values():
        if not hasattr(item, "unprotect") or getattr(item, "_remembers_partial_iv", False):
            continue
        original = item.unprotect

        def unprotect(protected: Message, request_id: Any = None, _original: Any = original) -> Any:
            unprotected, request_id = _original(protected, request_id)
            _, _, header, _ = CanUnprotect._extract_encrypted0(protected)
            piv = header.get(COSE_PIV)
            unprotected.partial_iv = int.from_bytes(piv, "big") if piv else None
            return unprotected, request_id

        item.unprotect = unprotect
        item._remembers_partial_iv = True
        installed += 1
    return installed


async def fresh_notifications(
    observation: Any, on_replay: Callable[[], None] = lambda: None
) -> AsyncIterator[Message]:
    """The notifications of one observation, without those whose Partial IV is not above
    the highest seen (each dropped one is reported to ``on_replay``)."""
    highest: int | None = None
    async for notification in observation:
        piv = getattr(notification, "partial_iv", None)
        if piv is not None:
            if highest is not None and piv <= highest:
                on_replay()
                continue
            highest = piv
        yield notification
