"""One error tree for the whole gateway; each class carries its CoAP response code.

Codes are plain integers (class << 5 | detail, RFC 7252 section 3) so the core needs
no CoAP library; ``gateway.coap.errors.error_to_response`` is the one place that turns
an error into a response.
"""

from __future__ import annotations

from enum import IntEnum


class ResponseCode(IntEnum):
    """CoAP response codes used by the gateway (RFC 7252 section 12.1.2)."""

    CREATED = 0x41  # 2.01
    DELETED = 0x42  # 2.02
    VALID = 0x43  # 2.03
    CHANGED = 0x44  # 2.04
    CONTENT = 0x45  # 2.05
    BAD_REQUEST = 0x80  # 4.00
    UNAUTHORIZED = 0x81  # 4.01
    BAD_OPTION = 0x82  # 4.02
    FORBIDDEN = 0x83  # 4.03
    NOT_FOUND = 0x84  # 4.04
    METHOD_NOT_ALLOWED = 0x85  # 4.05
    NOT_ACCEPTABLE = 0x86  # 4.06
    CONFLICT = 0x89  # 4.09
    PRECONDITION_FAILED = 0x8C  # 4.12
    REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
    UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
    SERVICE_UNAVAILABLE = 0xA3  # 5.03


class GatewayError(Exception):
    """Base of every error the gateway answers with; ``str(err)`` is the diagnostic."""

    code: ResponseCode = ResponseCode.BAD_REQUEST

    def __init__(self, diagnostic: str) -> None:
        super().__init__(diagnostic)
        self.diagnostic = diagnostic


class BadRequest(GatewayError):
    code = ResponseCode.BAD_REQUEST


class CodecError(BadRequest):
    """Untrusted bytes did not decode to a valid model; the only error codecs raise."""


class BadOption(GatewayError):
    code = ResponseCode.BAD_OPTION


class PayloadTooLarge(GatewayError):
    code = ResponseCode.REQUEST_ENTITY_TOO_LARGE


class UnsupportedContentFormat(GatewayError):
    code = ResponseCode.UNSUPPORTED_CONTENT_FORMAT


class Unauthorized(GatewayError):
    code = ResponseCode.UNAUTHORIZED


class Forbidden(GatewayError):
    code = ResponseCode.FORBIDDEN


class NotFound(GatewayError):
    code = ResponseCode.NOT_FOUND


class MethodNotAllowed(GatewayError):
    code = ResponseCode.METHOD_NOT_ALLOWED


class Conflict(GatewayError):
    code = ResponseCode.CONFLICT


class PreconditionFailed(GatewayError):
    code = ResponseCode.PRECONDITION_FAILED


class StoreUnavailable(GatewayError):
    """The core store could not be reached; nothing was acknowledged."""

    code = ResponseCode.SERVICE_UNAVAILABLE


class NotAcceptable(GatewayError):
    code = ResponseCode.NOT_ACCEPTABLE


class PeerUnavailable(GatewayError):
    """The gateway of another domain could not be found or reached; nothing was
    acknowledged, so the device may retry (with the same message id)."""

    code = ResponseCode.SERVICE_UNAVAILABLE


class PeerRefused(GatewayError):
    """The gateway of another domain answered with an error: relayed as it came."""

    def __init__(self, code: int, diagnostic: str) -> None:
        super().__init__(diagnostic)
        self.code = ResponseCode(code) if code in ResponseCode._value2member_map_ else ResponseCode.BAD_REQUEST
        self.raw_code = code
