"""Peer systems for ``python -m benchmarks payload``: each runs the scenario of
:mod:`benchmarks.peers.content` on loopback behind the counting relays of
:mod:`benchmarks.peers.meter` and returns a :class:`SystemRun`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .meter import Meter


class PeerUnavailable(Exception):
    """The peer system could not be started here; the message says why."""


@dataclass
class SystemRun:
    name: str
    meter: Meter
    transport: str  # "udp" or "tcp"
    how: str  # how the bytes were captured
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """End one process we started (by its own pid, never by name)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def which(program: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        raise PeerUnavailable(f"{program} not installed")
    return path


def self_signed_cert(directory: Any, name: str = "example.org") -> tuple[str, str]:
    """A throw-away P-256 certificate for ``name`` (openssl); returns (cert, key) paths."""
    cert = f"{directory}/{name}.crt"
    key = f"{directory}/{name}.key"
    if not os.path.exists(cert):
        result = subprocess.run(
            [which("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name}"],
            capture_output=True, timeout=30,
        )
        if result.returncode != 0:
            raise PeerUnavailable(f"openssl could not make a certificate: {result.stderr.decode()[-200:]}")
        os.chmod(key, 0o644)  # the servers may drop privileges before reading it
    return cert, key


async def next_matching(queue: asyncio.Queue[Any], check: Callable[[Any], bool], timeout: float) -> Any:
    """The next item from ``queue`` that passes ``check`` (others are dropped), within ``timeout``."""

    async def loop() -> Any:
        while True:
            item = await queue.get()
            if check(item):
                return item

    return await asyncio.wait_for(loop(), timeout)
