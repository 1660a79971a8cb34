"""``python -m device_sim.proxy --forward --bind HOST:PORT``: aiocoap's own CoAP proxy
program (``aiocoap-proxy``), with one bug of aiocoap 0.4.17 fixed, for trying devices
behind a standard forward proxy.

The bug: on the observation path (``ProxyWithPooledObservations``) the proxy passes
messages on as they came in, still marked as incoming: the first request of an
observation towards the server, and the server's first response and notifications
towards the client. aiocoap refuses to encode those (``AssertionError`` in
``Message.encode``, the client gets 5.00), so every Observe through ``aiocoap-proxy``
fails. The plain request path sets the direction; here it is set the same way. Everything
else is aiocoap's proxy unchanged.
"""

from __future__ import annotations

from typing import Any

from aiocoap import message
from aiocoap.protocol import ServerObservation
from aiocoap.proxy.server import ProxyWithPooledObservations


def install() -> None:
    original = ProxyWithPooledObservations._get_observation_for
    if getattr(original, "fixed_direction", False):
        return

    def _get_observation_for(self: Any, request: Any) -> Any:
        outgoing = request.copy()
        outgoing.direction = message.Direction.OUTGOING
        return original(self, outgoing)

    async def render(self: Any, request: Any) -> Any:
        return _outgoing(await original_render(self, request))

    def trigger(self: Any, response: Any = None, *, is_last: bool = False) -> None:
        original_trigger(self, None if response is None else _outgoing(response), is_last=is_last)

    original_render = ProxyWithPooledObservations.render
    original_trigger = ServerObservation.trigger
    _get_observation_for.fixed_direction = True  # type: ignore[attr-defined]
    ProxyWithPooledObservations._get_observation_for = _get_observation_for
    ProxyWithPooledObservations.render = render
    ServerObservation.trigger = trigger  # this process is the proxy: only its notifications


def _outgoing(response: Any) -> Any:
    if response is not None and response.direction != message.Direction.OUTGOING:
        response = response.copy()
        response.direction = message.Direction.OUTGOING
    return response


def main() -> None:
    from aiocoap.cli.proxy import sync_main

    install()
    sync_main()


if __name__ == "__main__":
    main()
