"""Two costs aiocoap 0.4.17 pays on every request that the gateway avoids. Measured with
py-spy under the IM load of ``python -m benchmarks throughput``:

- **Address texts.** aiocoap names a task after the request it renders (``"Rendering
  for %r"``), twice per request. Each such repr parses the peer's and the local address
  with ``ipaddress`` and asks the kernel for the local interface's name
  (``if_indextoname``): an eighth of an IM's CPU. Every response parses the local
  address again to learn whether the request came to a multicast address (another
  4%). Those answers depend on the address bytes only, so they are remembered. An
  interface renamed while the gateway runs keeps its old name in these texts, which
  only logs and task names show.
- **Option copies.** OSCORE copies every response before protecting it, and
  ``Message.copy`` deep-copies the options: about 13% of an IM's CPU for one
  Content-Format option. Option objects are values: they are set when made or
  decoded and never changed in place (any change replaces the option in its list).
  So a deep copy of ``Options`` gets the same option objects in lists of its own.
"""

from __future__ import annotations

import functools
import ipaddress
from types import SimpleNamespace
from typing import Any

from aiocoap.options import Options
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

    @functools.lru_cache(maxsize=1024)
    def local_is_multicast(pktinfo: bytes) -> bool:
        address = SimpleNamespace(pktinfo=pktinfo, _strip_v4mapped=strip_v4mapped)
        return bool(ipaddress.ip_address(original_local(address)).is_multicast)

    original_local = UDP6EndpointAddress._plainaddress_local
    UDP6EndpointAddress.is_multicast_locally = property(lambda self: local_is_multicast(bytes(self.pktinfo)))
    Options.__deepcopy__ = _options_copy


def _options_copy(self: Options, memo: dict[int, Any]) -> Options:
    copied = Options()
    copied._options = {number: list(values) for number, values in self._options.items()}
    return copied
