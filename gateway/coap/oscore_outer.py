"""OSCORE through a forward proxy: Proxy-Scheme and Uri-Port stay outside the protection.

RFC 8613 section 4.1.3.2 puts Uri-Host, Uri-Port, Proxy-Scheme and Proxy-Uri in class U:
outer options a forward proxy reads to know where the request goes. aiocoap 0.4.17's
client keeps only Uri-Host outside (``CanProtect._split_message``) and drops the other
two, so a forward proxy sees a request for itself and answers 4.00 "No matching proxy
rule" (measured with ``aiocoap-proxy --forward``). :func:`install` puts them back on the
outer message. They are not in OSCORE's additional authenticated data (class I only), so
the server's verification is unchanged. Idempotent; aiocoap is pinned to 0.4.17.
"""

from __future__ import annotations

from typing import Any

from aiocoap import oscore

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    original = oscore.CanProtect._split_message

    def _split_message(self: Any, message: Any, request_id: Any) -> Any:
        outer, plaintext = original(self, message, request_id)
        if message.code.is_request() and message.opt.proxy_uri is None:
            if message.opt.proxy_scheme is not None:
                outer.opt.proxy_scheme = message.opt.proxy_scheme
            if message.opt.uri_port is not None:
                outer.opt.uri_port = message.opt.uri_port
        return outer, plaintext

    oscore.CanProtect._split_message = _split_message
    _installed = True
