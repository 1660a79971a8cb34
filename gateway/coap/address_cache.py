"""aiocoap names a task after the request it renders (``"Rendering for %r"``), twice
per request. Each such repr parses the peer's and the local address with ``ipaddress``
and asks the kernel for the local interface's name (``if_indextoname``): an eighth of
the CPU an IM costs the gateway. Those texts depend on the address bytes only, so
they are remembered. (An interface renamed while the gateway runs keeps its old name
in these texts, which only logs and task names show.)"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from aiocoap.transports.udp6 import UDP6EndpointAddress

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    strip_v4mapped = functools.lru_cache(maxsize=65536)(UDP6EndpointAddress._strip_v4mapped)
    UDP6EndpointAddress._strip_v4mapped = staticmethod(strip_v4mapped)
    original_pktinfo = UDP6EndpointAddress._repr_pktinfo

    @functools.lru_cache(maxsize=1024)
    def pktinfo_text(pktinfo: bytes) -> str:
        return str(original_pktinfo(SimpleNamespace(pktinfo=pktinfo, _strip_v4mapped=strip_v4mapped)))

    def repr_pktinfo(self: Any) -> str:
        return pktinfo_text(bytes(self.pktinfo))

    UDP6EndpointAddress._repr_pktinfo = repr_pktinfo
