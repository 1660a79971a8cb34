"""A device speaking CoAP and OSCORE from a bare UDP socket, for tests that must control
tokens, message ids and the exact bytes on the wire (deregistration, replays, bit flips)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.oscore import FilesystemSecurityContext


class RawDevice:
    def __init__(self, port: int, context_dir: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))
        self.security = FilesystemSecurityContext(str(context_dir)) if context_dir is not None else None
        self._mid = 0
        self.request_ids: dict[bytes, Any] = {}
        self.last_mtype: Any = None

    def close(self) -> None:
        """Idempotent."""
        self.sock.close()
        if self.security is not None and self.security.lockfile is not None:
            self.security._destroy()
            self.security = None

    def datagram(self, request: Message, token: bytes) -> bytes:
        """Encode (and OSCORE-protect, if this device has a context) a CON request."""
        self._mid += 1
        if self.security is not None:
            request, request_id = self.security.protect(request)
            self.request_ids[token] = request_id
        request.mtype = aiocoap.CON
        request.mid = self._mid
        request.token = token
        return bytes(request.encode())

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self, token: bytes, timeout: float = 5.0) -> Message:
        """The next response (or notification) datagram, unprotected."""
        raw = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        response = Message.decode(raw)
        self.last_mtype = response.mtype  # of the datagram itself (the unprotected inner message has none)
        if response.mtype == aiocoap.CON:  # a CON notification wants its ACK
            ack = Message(code=aiocoap.EMPTY, _mtype=aiocoap.ACK, _mid=response.mid)
            await self.send_raw(bytes(ack.encode()))
        if self.security is not None and response.opt.oscore is not None:
            response, _ = self.security.unprotect(response, self.request_ids[token])
        return response

    async def exchange(self, request: Message, token: bytes) -> Message:
        await self.send_raw(self.datagram(request, token))
        return await self.receive(token)
