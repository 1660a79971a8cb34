"""The one place that turns a gateway error into a CoAP response."""

from __future__ import annotations

from aiocoap import Code, Message

from ..core.errors import GatewayError


def error_to_response(err: GatewayError) -> Message:
    # Diagnostic payload (RFC 7252 5.5.2): short UTF-8 text, no content format.
    # A peer gateway's error (federation) is relayed with its own code, whatever it is.
    code = getattr(err, "raw_code", int(err.code))
    return Message(code=Code(code), payload=short_diagnostic(err.diagnostic))


def short_diagnostic(text: str, limit: int = 120) -> bytes:
    """At most ``limit`` bytes of UTF-8, never cut inside a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")
