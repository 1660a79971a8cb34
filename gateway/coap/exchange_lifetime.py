"""How long the gateway remembers an incoming message id, and the response it gave, to
answer a retransmission the same way: RFC 7252's EXCHANGE_LIFETIME (247 s by default).

aiocoap keeps every such entry for the EXCHANGE_LIFETIME of the incoming message's
TransportTuning, which for incoming messages is always the global default, at about
2 KB each: the duplicate cache holds request rate x lifetime x 2 KB (700 requests/s:
about 0.5 GB). ``serve --exchange-lifetime`` sizes it to the deployment.

Shortening it is safe here. A protected request that arrives again after it was
forgotten is refused by OSCORE replay protection (4.01 "Replay detected"), not run
twice. Every request is idempotent anyway: an IM is stored once per (sender, message
id), a publish or an acknowledgement repeated changes nothing. The cost of a too short
lifetime is that a device still retransmitting gets that 4.01 instead of its answer:
keep it at least the devices' MAX_TRANSMIT_SPAN plus twice the worst one-way latency.
"""

from __future__ import annotations

from typing import Any

from aiocoap.numbers.constants import TransportTuning

RFC7252_EXCHANGE_LIFETIME = 247.0


class _IncomingTuning(TransportTuning):  # type: ignore[misc]
    def __init__(self, exchange_lifetime: float) -> None:
        self._exchange_lifetime = exchange_lifetime

    @property
    def EXCHANGE_LIFETIME(self) -> float:
        return self._exchange_lifetime


class DuplicateCache:
    """The duplicate cache of one aiocoap message manager, with our lifetime."""

    def __init__(self, message_manager: Any, exchange_lifetime: float) -> None:
        if exchange_lifetime <= 0:
            raise ValueError("the exchange lifetime must be positive")
        self._manager = message_manager
        self.exchange_lifetime = exchange_lifetime
        tuning = _IncomingTuning(exchange_lifetime)
        original = message_manager._deduplicate_message

        def deduplicate(message: Any) -> Any:
            # Only the cache reads an incoming message's tuning.
            message.transport_tuning = tuning
            return original(message)

        message_manager._deduplicate_message = deduplicate

    def __len__(self) -> int:
        return len(self._manager._recent_messages)
