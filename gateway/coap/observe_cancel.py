"""Cancelling an OSCORE-protected observation at the client, so that the server learns.

aiocoap 0.4.17's client sends nothing when an observation is cancelled (#13); RFC 7641
3.6 expects the next notification to be answered with an RST instead, and that works
for plain requests. Over OSCORE it does not: the OSCORE transport keeps the *outer*
(protected) request registered (``transports/oscore.py``: "no way yet to cancel
observations exists"), so the client goes on acknowledging every notification and
the server never drops the observation (measured: still observed after three further
notifications). A device that stops watching, or a gateway that no longer needs an
observation at a peer, would leave it running there for good.

:func:`install` ties the two together: when the inner request loses interest (the
application cancelled), the outer request's observation is cancelled too, so its token
is forgotten and the next notification gets an RST. Idempotent; aiocoap is pinned to
0.4.17, whose internals this relies on (``TransportOSCORE.request`` and ``_wire``).
"""

from __future__ import annotations

import contextvars
from typing import Any

from aiocoap.transports import oscore as oscore_transport

_inner_pipe: contextvars.ContextVar[Any] = contextvars.ContextVar("inner_pipe", default=None)
_installed = False


class _WireThatTiesObservations:
    """Stands in for the transport's ``_wire`` (the context it sends protected
    requests through): each protected request it sends for an inner request follows
    that inner request's end of interest."""

    def __init__(self, wire: Any) -> None:
        self._wire = wire

    def request(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        wire_request = self._wire.request(message, *args, **kwargs)
        inner = _inner_pipe.get()
        if inner is not None:

            def cancel_outer() -> None:
                observation = getattr(wire_request, "observation", None)
                if observation is not None and not observation.cancelled:
                    observation.cancel()

            inner.on_interest_end(cancel_outer)
        return wire_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wire, name)


def install() -> None:
    global _installed
    if _installed:
        return
    original_request = oscore_transport.TransportOSCORE.request

    def request(self: Any, pipe: Any) -> None:
        if not isinstance(self._wire, _WireThatTiesObservations):
            self._wire = _WireThatTiesObservations(self._wire)
        token = _inner_pipe.set(pipe)  # copied into the task the original creates
        try:
            original_request(self, pipe)
        finally:
            _inner_pipe.reset(token)

    oscore_transport.TransportOSCORE.request = request
    _installed = True
