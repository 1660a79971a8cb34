"""The one place that turns a gateway error into a CoAP response."""

from __future__ import annotations

from aiocoap import Code, Message

from ..core.errors import GatewayError


def error_to_response(err: GatewayError) -> Message:
    # Diagnostic payload (RFC 7252 5.5.2): short UTF-8 text, no content format.
    return Message(code=Code(int(err.code)), payload=err.diagnostic.encode("utf-8")[:120])
