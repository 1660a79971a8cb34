"""Throughput, fan-out and memory of the gateway, side by side with bare aiocoap.

``python -m benchmarks throughput [--quick | --smoke] [--out DIR] [--redis URL]``

Theory of operation
===================

One run measures, on loopback, with every request OSCORE-protected (RFC 8613) and
confirmable:

1. **IMs/s.** Provisioned devices POST instant messages as fast as they are answered,
   one CON request in flight per device (aiocoap's NSTART is 1 per peer), each device
   with its own UDP socket and OSCORE context, spread over load-generator processes.
   The same load, with the same kind of server-side OSCORE credentials
   (:class:`gateway.keys.KidIndexedCredentials`), runs against a bare aiocoap echo
   resource, the gateway with one worker process, the gateway with two (``serve
   --workers 2``: SO_REUSEPORT on one port, Redis store and event bus) and, in the full
   run, the gateway with its default SQLite store. Then presence notifications/s:
   publishers PUT presence in a loop while watcher devices observe every publisher.
2. **Fan-out**: the time from one publish (just before its request is sent) to the
   last watcher's application having the notification, for 1, 100 and 1,000
   watchers, each a device observing over OSCORE. Publishes are isolated (the next
   waits until no retransmission of the last is pending); then the largest fan-out
   is repeated with publishes 0.3 s apart, where notifications whose ACK was lost
   hold up the next one to the same watcher (NSTART 1).
3. **Memory**: the gateway's RSS before any device spoke, after every watcher device
   made one request (its security context is loaded), and after each of them
   observes (RSS delta / observations); then 100,000 entities registered in bulk
   through the store API (SQLite and Redis): time, bytes per entity, and the RSS of the
   running gateway whose database received them.
4. **Duplicate cache**: aiocoap keeps every incoming CON's response for
   EXCHANGE_LIFETIME; the value in effect, how it is derived, whether the gateway has a
   knob, and the memory it holds at the measured rate (the RSS growth per request is
   measured in step 1, where nothing has expired yet); then the same IM load on a
   gateway started with ``--exchange-lifetime`` equal to the warm-up, whose RSS growth
   per request in the window is the steady state of a sized cache.

Load generators use :class:`LeanDevice`, a minimal CoAP-over-UDP client with aiocoap's
own message codec and OSCORE contexts (the same ``FilesystemSecurityContext`` that
``aiocoap-client --credentials`` uses): CON with retransmission, piggybacked or
separate responses, empty ACKs to CON notifications, OSCORE Echo recovery. It costs
the client about half of what a full aiocoap client context costs per request, so that
on a small machine more CPU is left to the server being measured. Message ids are
counted per device: one device stays far below the ~265 CON/s that 16-bit message ids
allow a peer pair within EXCHANGE_LIFETIME (aiocoap #399); the result says so.

Every figure comes with the CPU it took (per process, from /proc) and what limited it:
the server's one core per process (aiocoap #73), the machine's cores (load generators,
Redis and processes that are not ours share them), or neither (a latency-bound closed
loop). With 2 cores, 2 gateway workers cannot be given a core each while something else
generates the load: the 2-worker target is then reported as unmeasurable, with the
measured ratio and the per-CPU-second figures beside it.

Every process and Redis key this run creates is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "example.org"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

# CoAP transmission parameters of the load generators (RFC 7252 4.8 defaults).
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
MID_CAP_PER_S = 65536 / 247.0  # message ids a peer pair may use per second (aiocoap #399)
NOTES_DUP_CACHE_BYTES = 2100  # aiocoap-notes: ~2.1 KB per request held by the duplicate cache
NOTES_OBSERVATION_BYTES = 11500  # aiocoap-notes: ~11.5 KB RSS per observation

TARGETS = {
    "gateway_vs_bare_im_rate": 0.70,
    "two_vs_one_worker_im_rate": 1.7,
    "fanout_1000_s": 1.0,
}


# -- sizes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    name: str
    im_devices: int  # devices sending IMs, one socket + OSCORE context each
    loadgens: int  # load-generator processes for the IM load
    warmup_s: float
    measure_s: float
    presence_publishers: int
    presence_watchers: int  # watcher devices, each observing every publisher
    presence_s: float
    fanout: tuple[int, ...]  # watcher counts
    fanout_reps: int
    watcher_procs: int
    register: int  # entities registered in bulk, per store
    sqlite_im: bool  # also measure IMs/s with the default SQLite store
    settle_s: float = 1.0  # pause before reading an idle RSS
    bare_again: bool = False  # measure bare aiocoap again after the gateways (drift of the machine's load)


FULL = Sizes("full", 128, 2, 3.0, 15.0, 8, 100, 10.0, (1, 100, 1000), 5, 2, 100_000, True, bare_again=True)
QUICK = Sizes("quick", 64, 2, 1.0, 4.0, 4, 50, 3.0, (1, 100, 1000), 3, 2, 10_000, False)
SMOKE = Sizes("smoke", 4, 1, 0.2, 0.6, 1, 2, 0.5, (1, 3), 1, 1, 300, False, settle_s=0.2)


# -- /proc -----------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def udp_drops() -> int:
    """Datagrams the kernel dropped for full receive buffers, machine-wide (RcvbufErrors)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    try:
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (IndexError, ValueError):
        return 0


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@dataclass
class CpuSample:
    at: float
    per_pid: dict[int, float]
    machine_busy: float
    own: float  # this (parent) process
    udp_drops: int

    @classmethod
    def take(cls, pids: Iterable[int]) -> CpuSample:
        busy, _ = machine_cpu()
        return cls(time.monotonic(), {pid: cpu_seconds(pid) for pid in pids}, busy, time.process_time(), udp_drops())


def cores(before: CpuSample, after: CpuSample, pids: Iterable[int]) -> float:
    elapsed = max(1e-9, after.at - before.at)
    return sum(after.per_pid.get(p, 0.0) - before.per_pid.get(p, 0.0) for p in pids) / elapsed


# -- a lean CoAP/OSCORE device ---------------------------------------------------------


class RequestFailed(Exception):
    pass


@dataclass
class _Exchange:
    future: asyncio.Future[Any]
    request_id: Any
    datagram: bytes
    mid: int
    observe: Callable[[Any], None] | None
    timer: asyncio.TimerHandle | None = None
    attempts: int = 0


class LeanDevice(asyncio.DatagramProtocol):
    """One device: a connected UDP socket and one OSCORE context; CON requests, one at a
    time is what callers do (NSTART 1). Incoming CON responses and notifications are
    acknowledged; a retransmitted one (same message id) is acknowledged and dropped."""

    def __init__(self, context_dir: str, user: str, rng: random.Random) -> None:
        from aiocoap.oscore import FilesystemSecurityContext

        self.security: Any = FilesystemSecurityContext(context_dir)
        self.user = user
        self.rng = rng
        self.mid = rng.randrange(65536)
        self.token = rng.getrandbits(32)
        self.exchanges: dict[bytes, _Exchange] = {}
        self.by_mid: dict[int, bytes] = {}
        self.observations: dict[bytes, tuple[Any, Callable[[Any], None]]] = {}
        self._seen_mids: deque[int] = deque(maxlen=64)
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0  # CON messages sent (first transmissions)
        self.retransmissions = 0
        self.echo_recoveries = 0
        self.undecodable = 0
        self.duplicates = 0  # retransmitted CONs received (our ACK was late or lost)

    @classmethod
    async def open(cls, context_dir: str, user: str, server: tuple[str, int], rng: random.Random) -> LeanDevice:
        loop = asyncio.get_running_loop()
        _, device = await loop.create_datagram_endpoint(lambda: cls(context_dir, user, rng), remote_addr=server)
        return device

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: retransmission covers them

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(data)

    def _ack(self, mid: int) -> None:
        from aiocoap import ACK, EMPTY, Message

        ack = Message(code=EMPTY)
        ack.mtype = ACK
        ack.mid = mid
        self._send(ack.encode())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        from aiocoap import ACK, CON, EMPTY, RST, Message

        try:
            msg = Message.decode(data)
        except Exception:
            self.undecodable += 1
            return
        if msg.mtype in (ACK, RST):
            token = self.by_mid.pop(msg.mid, None)
            exchange = self.exchanges.get(token) if token is not None else None
            if exchange is not None and exchange.timer is not None:
                exchange.timer.cancel()
                exchange.timer = None
            if msg.mtype is RST:
                if token is not None and exchange is not None:
                    self._fail(token, RequestFailed("reset by the server"))
                return
            if msg.code is EMPTY:
                return
        elif msg.mtype is CON:
            self._ack(msg.mid)
            if msg.mid in self._seen_mids:
                self.duplicates += 1
                return
            self._seen_mids.append(msg.mid)
        if not msg.code.is_response():
            return
        exchange = self.exchanges.pop(msg.token, None)
        if exchange is not None:
            if exchange.timer is not None:
                exchange.timer.cancel()
            self.by_mid.pop(exchange.mid, None)
            try:
                response, _ = self.security.unprotect(msg, exchange.request_id)
            except Exception as exc:
                if not exchange.future.done():
                    exchange.future.set_exception(RequestFailed(f"unprotect failed: {exc!r}"))
                return
            if exchange.observe is not None and msg.opt.observe is not None and response.code.is_successful():
                self.observations[msg.token] = (exchange.request_id, exchange.observe)
            if not exchange.future.done():
                exchange.future.set_result(response)
            return
        observation = self.observations.get(msg.token)
        if observation is not None:
            try:
                notification, _ = self.security.unprotect(msg, observation[0])
            except Exception:
                self.undecodable += 1
                return
            observation[1](notification)

    def _fail(self, token: bytes, exc: Exception) -> None:
        exchange = self.exchanges.pop(token, None)
        if exchange is None:
            return
        if exchange.timer is not None:
            exchange.timer.cancel()
        self.by_mid.pop(exchange.mid, None)
        if not exchange.future.done():
            exchange.future.set_exception(exc)

    def _retransmit(self, token: bytes, timeout: float) -> None:
        exchange = self.exchanges.get(token)
        if exchange is None or exchange.mid not in self.by_mid:
            return
        if exchange.attempts >= MAX_RETRANSMIT:
            self._fail(token, TimeoutError("no answer after 4 retransmissions"))
            return
        exchange.attempts += 1
        self.retransmissions += 1
        self._send(exchange.datagram)
        exchange.timer = asyncio.get_running_loop().call_later(timeout * 2, self._retransmit, token, timeout * 2)

    async def _exchange(self, inner: Any, observe: Callable[[Any], None] | None) -> Any:
        from aiocoap import CON

        protected, request_id = self.security.protect(inner)
        self.mid = (self.mid + 1) & 0xFFFF
        self.token = (self.token + 1) & 0xFFFFFFFF
        token = self.token.to_bytes(4, "big")
        protected.mtype = CON
        protected.mid = self.mid
        protected.token = token
        datagram = protected.encode()
        loop = asyncio.get_running_loop()
        exchange = _Exchange(loop.create_future(), request_id, datagram, self.mid, observe)
        self.exchanges[token] = exchange
        self.by_mid[self.mid] = token
        self.sent += 1
        self._send(datagram)
        timeout = ACK_TIMEOUT * (1 + self.rng.random() * (ACK_RANDOM_FACTOR - 1))
        exchange.timer = loop.call_later(timeout, self._retransmit, token, timeout)
        return await exchange.future

    async def request(self, inner: Any, observe: Callable[[Any], None] | None = None) -> Any:
        """Send ``inner`` (an unprotected aiocoap Message) protected; the unprotected response."""
        from aiocoap import UNAUTHORIZED

        response = await self._exchange(inner, observe)
        if response.code == UNAUTHORIZED and response.opt.echo is not None:
            # OSCORE B.1.2: the server lost its replay window (it was not shut down
            # cleanly); repeat the request with its Echo value.
            self.echo_recoveries += 1
            response = await self._exchange(inner.copy(echo=response.opt.echo), observe)
        return response

    def close(self) -> None:
        for token in list(self.exchanges):
            self._fail(token, RequestFailed("device closed"))
        if self.transport is not None:
            self.transport.close()
        # Persist the sequence number and release the context's lock now.
        if getattr(self.security, "lockfile", None) is not None:
            self.security._destroy()


# -- load-generator and server child processes ---------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "stop"}
    result: dict[str, Any] = json.loads(line)
    return result


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _percentiles_ms(samples: Sequence[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


async def _open_devices(spec: dict[str, Any]) -> list[LeanDevice]:
    server = ("127.0.0.1", int(spec["port"]))
    seed = int(spec.get("seed", 0))
    devices = []
    for index, item in enumerate(spec["devices"]):
        devices.append(await LeanDevice.open(item["dir"], item["user"], server, random.Random(seed * 100_003 + index)))
    return devices


async def child_sender(spec: dict[str, Any]) -> None:
    """Mode ``im`` (POST an IM to a peer's inbox) or ``publish`` (PUT own presence), in a
    closed loop per device; counts answers completed within [start, end]."""
    from aiocoap import CHANGED, CREATED, POST, PUT, Message

    from gateway.core import codec
    from gateway.core.ids import UserId
    from gateway.core.model import InstantMessage, MessageId, PresenceDocument, Status

    mode = spec["mode"]
    devices = await _open_devices(spec)
    reader = await _stdin_lines()
    _emit({"event": "ready"})
    go = await _read_command(reader)
    if go.get("cmd") != "go":
        for device in devices:
            device.close()
        return
    start, end = float(go["start"]), float(go["end"])
    ok_window = 0
    ok_total = 0
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    sent_in_window = [0] * len(devices)
    cpu: dict[str, float] = {}

    async def clock() -> None:
        await _sleep_until(start)
        cpu["start"] = time.process_time()
        await _sleep_until(end)
        cpu["end"] = time.process_time()

    async def loop(index: int, device: LeanDevice, peer: str) -> None:
        nonlocal ok_window, ok_total
        n = 0
        while time.monotonic() < end:
            n += 1
            if mode == "im":
                # Random ids: runs sharing a store must not resend each other's messages.
                message = InstantMessage(
                    MessageId(os.urandom(8)), UserId(device.user), UserId(peer), f"hello {n}".encode()
                )
                inner = Message(
                    code=POST,
                    uri_path=("i", peer),
                    payload=codec.encode_message(message, include_from=False),
                    content_format=60,
                )
                expected = CREATED
            else:
                doc = PresenceDocument(Status.OPEN, note=f"r{n}")
                inner = Message(
                    code=PUT,
                    uri_path=("p", device.user),
                    payload=codec.encode_presence(doc, for_publish=True),
                    content_format=60,
                )
                expected = CHANGED
            began = time.monotonic()
            if start <= began < end:
                sent_in_window[index] += 1
            try:
                response = await device.request(inner)
            except Exception as exc:
                failures[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            done = time.monotonic()
            if response.code == expected:
                ok_total += 1
                if start <= done <= end:
                    ok_window += 1
                    latencies.append(done - began)
            else:
                codes[str(response.code)] += 1

    clock_task = asyncio.create_task(clock())
    tasks = [asyncio.create_task(loop(i, d, item.get("peer", ""))) for i, (d, item) in
             enumerate(zip(devices, spec["devices"], strict=True))]
    # Requests still in flight at the end finish (or time out) here.
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.monotonic()) + 10.0)
    for task in pending:
        task.cancel()
    await clock_task
    window = end - start
    _emit(
        {
            "event": "result",
            "mode": mode,
            "ok": ok_window,
            "ok_total": ok_total,
            "unfinished": len(pending),
            "codes": dict(codes),
            "failures": dict(failures),
            "latency_ms": _percentiles_ms(latencies),
            "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0),
            "window_s": window,
            "retransmissions": sum(d.retransmissions for d in devices),
            "echo_recoveries": sum(d.echo_recoveries for d in devices),
            "max_device_con_per_s": max(sent_in_window, default=0) / window if window > 0 else 0.0,
            "max_device_con_total": max((d.sent + d.retransmissions for d in devices), default=0),
            "devices": len(devices),
        }
    )
    for device in devices:
        device.close()


async def child_watcher(spec: dict[str, Any]) -> None:
    """Mode ``watch``: each device observes its presentities. With ``prefetch`` each
    device first GETs once (its context gets loaded in the gateway) and waits for
    ``observe``. Counts notifications within a window; for notes starting with ``fan:``
    reports when every local observer of that presentity has it."""
    from aiocoap import CONTENT, GET, Message

    from gateway.core import codec

    devices = await _open_devices(spec)
    reader = await _stdin_lines()
    watches: list[list[str]] = [item["watch"] for item in spec["devices"]]
    local_observers: Counter[str] = Counter(p for ws in watches for p in ws)
    window = [math.inf, -math.inf]
    counted = [0]
    total = [0]
    tags: dict[tuple[str, str], list[float]] = {}
    failures: Counter[str] = Counter()
    cpu: dict[str, float] = {}

    def on_notification(presentity: str) -> Callable[[Any], None]:
        def handle(notification: Any) -> None:
            now = time.monotonic()
            total[0] += 1
            if window[0] <= now <= window[1]:
                counted[0] += 1
            if notification.code != CONTENT:
                failures[f"notification {notification.code}"] += 1
                return
            try:
                note = codec.decode_presence_view(notification.payload).note or ""
            except Exception:
                failures["undecodable notification"] += 1
                return
            if note.startswith("fan:"):
                seen = tags.setdefault((presentity, note), [])
                seen.append(now)
                if len(seen) == local_observers[presentity]:
                    _emit({"event": "complete", "presentity": presentity, "tag": note,
                           "first": min(seen), "last": max(seen), "n": len(seen)})

        return handle

    async def gather_limited(make: Callable[[int], Awaitable[None]], count: int, limit: int = 200) -> None:
        gate = asyncio.Semaphore(limit)

        async def one(i: int) -> None:
            async with gate:
                await make(i)

        await asyncio.gather(*(one(i) for i in range(count)))

    if spec.get("prefetch"):
        async def fetch(i: int) -> None:
            try:
                response = await devices[i].request(Message(code=GET, uri_path=("p", watches[i][0])))
                if response.code != CONTENT:
                    failures[f"fetch {response.code}"] += 1
            except Exception as exc:
                failures[f"fetch {type(exc).__name__}"] += 1

        await gather_limited(fetch, len(devices))
        _emit({"event": "ready", "stage": "contexts"})
        command = await _read_command(reader)
        if command.get("cmd") != "observe":
            for device in devices:
                device.close()
            return

    async def observe(i: int) -> None:
        for presentity in watches[i]:
            try:
                response = await devices[i].request(
                    Message(code=GET, uri_path=("p", presentity), observe=0), observe=on_notification(presentity)
                )
                if response.code != CONTENT or response.opt.observe is None:
                    failures[f"observe {response.code}"] += 1
            except Exception as exc:
                failures[f"observe {type(exc).__name__}"] += 1

    await gather_limited(observe, len(devices))
    _emit({"event": "ready", "stage": "observing", "observations": sum(len(d.observations) for d in devices)})
    while True:
        command = await _read_command(reader)
        if command.get("cmd") == "window":
            window[0], window[1] = float(command["start"]), float(command["end"])

            async def clock() -> None:
                await _sleep_until(window[0])
                cpu["start"] = time.process_time()
                await _sleep_until(window[1])
                cpu["end"] = time.process_time()

            asyncio.get_running_loop().create_task(clock())
        elif command.get("cmd") == "stop":
            break
    _emit(
        {
            "event": "result",
            "mode": "watch",
            "notifications": counted[0],
            "notifications_total": total[0],
            "observations": sum(len(d.observations) for d in devices),
            "failures": dict(failures),
            "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0),
            "retransmissions": sum(d.retransmissions for d in devices),
            "echo_recoveries": sum(d.echo_recoveries for d in devices),
            "duplicates_received": sum(d.duplicates for d in devices),
        }
    )
    for device in devices:
        device.close()


async def child_bare_server(spec: dict[str, Any]) -> None:
    """Bare aiocoap: an echo resource (2.01 with the request's payload) under the same
    OSCORE site wrapper and the same kind of credentials as the gateway."""
    import aiocoap
    from aiocoap import resource
    from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

    from gateway.keys import KeyStore, KidIndexedCredentials

    class Echo(resource.Resource, resource.PathCapable):  # type: ignore[misc]
        async def render(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CREATED, payload=request.payload)

    site = resource.Site()
    site.add_resource(["i"], Echo())
    credentials = KidIndexedCredentials(KeyStore(Path(spec["keys"])))
    context = await aiocoap.Context.create_server_context(
        OscoreSiteWrapper(site, credentials),
        bind=("127.0.0.1", int(spec["port"])),
        transports=["udp6"],
        server_credentials=credentials,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _emit({"event": "ready"})
    await stop.wait()
    await context.shutdown()
    credentials.close()


def child_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    role = spec["role"]
    runner = {"sender": child_sender, "watcher": child_watcher, "bare": child_bare_server}[role]
    asyncio.run(runner(spec))
    return 0


# -- the parent: processes -------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class Child:
    """A child process speaking JSON lines on stdout (events) and stdin (commands)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.arrived = asyncio.Event()
        self.eof = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            try:
                event = json.loads(text)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                self.lines.append(text)
                event = {"event": "line", "text": text}
            self.events.append(event)
            self.arrived.set()
        self.eof = True
        self.arrived.set()

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    async def take(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if predicate(event):
                    return self.events.pop(index)
            if self.eof:
                await self.proc.wait()
                raise ChildFailed(
                    f"{self.name} exited ({self.proc.returncode}) before {what}; log {self.log}:\n{_tail(self.log)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(
                    f"{self.name}: no {what} within {timeout:.0f} s (its other output: {self.lines[-5:]}); "
                    f"log {self.log}:\n{_tail(self.log)}"
                )
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    async def event(self, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
        return await self.take(
            lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in match.items()), timeout, kind
        )

    def send(self, command: dict[str, Any]) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write((json.dumps(command) + "\n").encode())

    def pids(self) -> list[int]:
        return [self.pid, *child_pids(self.pid)]

    async def stop(self, timeout: float = 15.0) -> None:
        if self.proc.returncode is None:
            workers = child_pids(self.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                for pid in [*workers, self.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class Run:
    """Everything one benchmark run creates, so that all of it is removed at the end."""

    def __init__(self, work: Path, redis_url: str | None, sizes: Sizes, progress: Progress) -> None:
        self.work = work
        self.redis_url = redis_url
        self.sizes = sizes
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:10]
        self.children: list[Child] = []
        self.redis_prefixes: list[str] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.counter = 0
        self.redis_pid: int | None = None

    async def spawn(self, name: str, argv: list[str]) -> Child:
        self.counter += 1
        log = self.work / f"{self.counter:02d}-{name}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=str(ROOT),
                env=self.env,
                limit=2**20,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def spawn_role(self, name: str, spec: dict[str, Any]) -> Child:
        self.counter += 1
        spec_path = self.work / f"{self.counter:02d}-{name}.json"
        spec_path.write_text(json.dumps(spec))
        return await self.spawn(name, [sys.executable, "-m", "benchmarks.throughput", "_child", str(spec_path)])

    async def stop(self, child: Child) -> None:
        await child.stop()
        if child in self.children:
            self.children.remove(child)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(c) for c in list(self.children)), return_exceptions=True)

    def prefix(self, name: str) -> str:
        prefix = f"impp:bench:{self.run_id}:{name}:"
        self.redis_prefixes.append(prefix)
        return prefix

    async def delete_redis_keys(self) -> int:
        if self.redis_url is None or not self.redis_prefixes:
            return 0
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url)
        deleted = 0
        try:
            for prefix in self.redis_prefixes:
                batch: list[bytes] = []
                async for key in client.scan_iter(match=prefix + "*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        deleted += await client.unlink(*batch)
                        batch = []
                if batch:
                    deleted += await client.unlink(*batch)
        finally:
            await client.aclose()
        return deleted


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    label: str
    child: Child
    port: int
    workers: int
    kind: str  # "bare" | "gateway"
    store: str

    def pids(self) -> list[int]:
        """The processes serving (the supervisor of several workers only waits)."""
        workers = child_pids(self.child.pid)
        return workers if self.workers > 1 and workers else [self.child.pid]

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())


async def start_gateway(
    run: Run, label: str, store: str, keys: Path, workers: int = 1, bus: str | None = None,
    extra: Sequence[str] = (),
) -> Server:
    port = free_udp_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            "--keys", str(keys), "--domain", DOMAIN, *extra]
    if bus is not None:
        argv += ["--bus", bus]
    if workers > 1:
        argv += ["--workers", str(workers)]
    child = await run.spawn(label, argv)
    server = Server(label, child, port, workers, "gateway", store)
    deadline = time.monotonic() + 60
    while True:
        # Each worker prints a ready line; its log line "gateway serving" comes just before.
        printed = sum("gateway ready" in e.get("text", "") for e in child.events)
        logged = child.log.read_text(errors="replace").count("gateway serving") if child.log.exists() else 0
        if max(printed, logged) >= workers and (workers == 1 or len(child_pids(child.pid)) >= workers):
            break
        if child.eof or time.monotonic() > deadline:
            await child.stop()
            raise ChildFailed(f"{label}: {max(printed, logged)} of {workers} workers ready "
                              f"(output {child.lines[-5:]}); log {child.log}:\n{_tail(child.log)}")
        await asyncio.sleep(0.05)
    return server


async def start_bare(run: Run, keys: Path) -> Server:
    port = free_udp_port()
    child = await run.spawn_role("bare-aiocoap", {"role": "bare", "port": port, "keys": str(keys)})
    await child.event("ready", 60)
    return Server("bare aiocoap echo", child, port, 1, "bare", "-")


# -- progress --------------------------------------------------------------------------


class Progress:
    """Progress on stderr (stdout carries the table and the JSON line): numbered steps,
    and a bar while a measurement window runs."""

    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.step_no = 0
        self.started = time.monotonic()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, text: str) -> None:
        self.step_no += 1
        self._print(f"[{self.step_no:2d}/{self.total}] {time.monotonic() - self.started:6.1f}s  {text}")

    def note(self, text: str) -> None:
        self._print(f"          {text}")

    async def window(self, label: str, start: float, end: float) -> None:
        """Show a bar until ``end`` (warm-up until ``start``)."""
        width = 30
        last_line = -math.inf
        while True:
            now = time.monotonic()
            if now >= end:
                break
            phase = "warm-up" if now < start else "measuring"
            done = 0.0 if now < start else (now - start) / max(1e-9, end - start)
            bar = "#" * int(width * done) + "." * (width - int(width * done))
            line = f"          [{bar}] {label}: {phase} {max(0.0, now - start):4.1f}/{end - start:.0f} s"
            if self.tty:
                self.stream.write("\r" + line)
                self.stream.flush()
            elif now - last_line >= 5.0:
                self._print(line)
                last_line = now
            await asyncio.sleep(min(0.25, max(0.0, end - now)))
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


# -- provisioning ----------------------------------------------------------------------


@dataclass
class Device:
    user: str
    dir: str


def provision(keys: Path, devices_dir: Path, users: Sequence[str]) -> dict[str, Device]:
    from gateway.core.ids import UserId
    from gateway.keys import KeyStore

    store = KeyStore(keys)
    out = {}
    for user in users:
        made = store.provision(UserId(user), devices_dir, "coap://127.0.0.1")
        out[user] = Device(user, str(made.context_dir))
    return out


async def register_users(store_url: str, users: Iterable[str]) -> None:
    from gateway.core.ids import UserId
    from gateway.core.model import UserRecord
    from gateway.store import open_store

    store = await open_store(store_url)
    try:
        pending = [store.add_user(UserRecord(UserId(u))) for u in users]
        for i in range(0, len(pending), 200):
            await asyncio.gather(*pending[i : i + 200])
    finally:
        await store.close()


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    parts = max(1, min(parts, len(items)))
    return [list(items[i::parts]) for i in range(parts)]


# -- phase 1: IMs/s and presence notifications/s ---------------------------------------


def _limits(
    server: Server, server_cores: float, loadgen_cores: float, loadgens: int, redis_cores: float,
    foreign_cores: float, machine_busy: float, in_flight: str,
) -> list[str]:
    ncpu = os.cpu_count() or 1
    per_process = server_cores / max(1, len(server.pids()))
    out = []
    if per_process >= 0.85:
        out.append(f"server CPU: {per_process:.2f} of a core per server process (one core per process, aiocoap #73)")
    if machine_busy >= 0.9 * ncpu:
        out.append(
            f"machine CPU: {machine_busy:.2f} of {ncpu} cores busy (server {server_cores:.2f}, "
            f"load generators {loadgen_cores:.2f}, Redis {redis_cores:.2f}, other processes {foreign_cores:.2f})"
        )
    if loadgen_cores / max(1, loadgens) >= 0.85:
        out.append(f"load generators: {loadgen_cores / max(1, loadgens):.2f} of a core per process")
    if not out:
        out.append(f"no CPU saturated: a latency-bound closed loop ({in_flight}, one CON each in flight, NSTART 1)")
    return out


async def _window_samples(
    run: Run, label: str, pids: list[int], start: float, end: float, rss_of: Sequence[int] = ()
) -> tuple[CpuSample, CpuSample, dict[str, int]]:
    """CPU of ``pids`` over the window, and the RSS of ``rss_of`` (the server's
    processes only: Redis grows with every stored message) at its start and end."""
    rss: dict[str, int] = {}
    await _sleep_until(start)
    before = CpuSample.take(pids)
    rss["start"] = sum(rss_bytes(p) for p in rss_of)
    await run.progress.window(label, start, end)
    await _sleep_until(end)
    after = CpuSample.take(pids)
    rss["end"] = sum(rss_bytes(p) for p in rss_of)
    return before, after, rss


def _redis_pids(run: Run) -> list[int]:
    return [run.redis_pid] if run.redis_pid else []


async def im_phase(run: Run, server: Server, devices: Sequence[Device], peers: dict[str, str]) -> dict[str, Any]:
    sizes = run.sizes
    specs = []
    for index, part in enumerate(_split(list(devices), sizes.loadgens)):
        specs.append({
            "role": "sender", "mode": "im", "port": server.port, "seed": index + 1,
            "devices": [{"user": d.user, "dir": d.dir, "peer": peers[d.user]} for d in part],
        })
    loadgens = [await run.spawn_role(f"im-load-{server.child.name}-{i}", s) for i, s in enumerate(specs)]
    for child in loadgens:
        await child.event("ready", 60)
    start = time.monotonic() + 0.3 + sizes.warmup_s
    end = start + sizes.measure_s
    for child in loadgens:
        child.send({"cmd": "go", "start": start, "end": end})
    server_pids = server.pids()
    tracked = [*server_pids, *[c.pid for c in loadgens], *_redis_pids(run)]
    before, after, rss = await _window_samples(run, f"{server.label}: IMs", tracked, start, end, server_pids)
    results = [await c.event("result", 60) for c in loadgens]
    for child in loadgens:
        await run.stop(child)
    return _sender_summary(run, server, results, before, after, rss, [c.pid for c in loadgens], len(devices))


def _sender_summary(
    run: Run, server: Server, results: list[dict[str, Any]], before: CpuSample, after: CpuSample,
    rss: dict[str, int], loadgen_pids: list[int], devices: int,
) -> dict[str, Any]:
    window = after.at - before.at
    ok = sum(r["ok"] for r in results)
    server_pids = server.pids()
    server_cores = cores(before, after, server_pids)
    loadgen_cores = cores(before, after, loadgen_pids)
    redis_cores = cores(before, after, _redis_pids(run))
    machine_busy = (after.machine_busy - before.machine_busy) / window
    own = (after.own - before.own) / window
    foreign = max(0.0, machine_busy - server_cores - loadgen_cores - redis_cores - own)
    rate = ok / window
    latencies = [r["latency_ms"] for r in results if r["latency_ms"]["p50"] is not None]
    codes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for r in results:
        codes.update(r["codes"])
        failures.update(r["failures"])
    return {
        "server": server.label,
        "store": server.store,
        "workers": server.workers,
        "rate_per_s": round(rate, 1),
        "ok_in_window": ok,
        "ok_total": sum(r["ok_total"] for r in results),
        "window_s": round(window, 2),
        "per_server_cpu_s": round(rate / server_cores, 1) if server_cores > 0 else None,
        "latency_ms_p50": max((lat["p50"] for lat in latencies), default=None),
        "latency_ms_p99": max((lat["p99"] for lat in latencies), default=None),
        "error_codes": dict(codes),
        "failures": dict(failures),
        "unfinished": sum(r["unfinished"] for r in results),
        "retransmissions": sum(r["retransmissions"] for r in results),
        "echo_recoveries": sum(r["echo_recoveries"] for r in results),
        "udp_receive_buffer_drops_machine_wide": after.udp_drops - before.udp_drops,
        "devices": devices,
        "load_generator_processes": len(results),
        "max_device_con_per_s": round(max(r["max_device_con_per_s"] for r in results), 1),
        "mid_cap_per_peer_per_s": round(MID_CAP_PER_S, 1),
        "mid_reused_within_exchange_lifetime": max(r["max_device_con_total"] for r in results) >= 65536,
        "cpu_cores": {
            "server": round(server_cores, 2),
            "per_server_process": round(server_cores / max(1, len(server_pids)), 2),
            "each_server_process": [round(cores(before, after, [p]), 2) for p in server_pids],
            "load_generators": round(loadgen_cores, 2),
            "load_generators_self_reported": round(sum(r["cpu_s"] for r in results) / window, 2),
            "redis": round(redis_cores, 2),
            "benchmark_parent": round(own, 2),
            "other_processes": round(foreign, 2),
            "machine_busy": round(machine_busy, 2),
            "machine_cores": os.cpu_count(),
        },
        "server_rss_growth_per_request_B": round((rss["end"] - rss["start"]) / ok) if ok else None,
        "server_rss_end_MB": round(rss["end"] / 1e6, 1),
        "limited_by": _limits(server, server_cores, loadgen_cores, len(results), redis_cores, foreign,
                              machine_busy, f"{devices} devices"),
    }


async def presence_phase(
    run: Run, server: Server, publishers: Sequence[Device], watchers: Sequence[Device]
) -> dict[str, Any]:
    sizes = run.sizes
    presentities = [p.user for p in publishers]
    watcher_children = []
    for index, part in enumerate(_split(list(watchers), sizes.watcher_procs)):
        spec = {"role": "watcher", "port": server.port, "seed": 100 + index,
                "devices": [{"user": d.user, "dir": d.dir, "watch": presentities} for d in part]}
        watcher_children.append(await run.spawn_role(f"presence-watch-{server.child.name}-{index}", spec))
    publisher = await run.spawn_role(
        f"presence-publish-{server.child.name}",
        {"role": "sender", "mode": "publish", "port": server.port, "seed": 99,
         "devices": [{"user": d.user, "dir": d.dir} for d in publishers]},
    )
    observations = 0
    for child in watcher_children:
        observations += (await child.event("ready", 120, stage="observing"))["observations"]
    await publisher.event("ready", 60)
    start = time.monotonic() + 0.3 + min(1.0, sizes.warmup_s)
    end = start + sizes.presence_s
    for child in watcher_children:
        child.send({"cmd": "window", "start": start, "end": end})
    publisher.send({"cmd": "go", "start": start, "end": end})
    pids = [*server.pids(), publisher.pid, *[c.pid for c in watcher_children], *_redis_pids(run)]
    before, after, _ = await _window_samples(run, f"{server.label}: presence", pids, start, end)
    published = await publisher.event("result", 60)
    for child in watcher_children:
        child.send({"cmd": "stop"})
    watched = [await c.event("result", 60) for c in watcher_children]
    for child in [publisher, *watcher_children]:
        await run.stop(child)
    window = after.at - before.at
    notifications = sum(w["notifications"] for w in watched)
    server_cores = cores(before, after, server.pids())
    loadgen_cores = cores(before, after, [publisher.pid, *[c.pid for c in watcher_children]])
    redis_cores = cores(before, after, _redis_pids(run))
    machine_busy = (after.machine_busy - before.machine_busy) / window
    foreign = max(0.0, machine_busy - server_cores - loadgen_cores - redis_cores - (after.own - before.own) / window)
    failures: Counter[str] = Counter()
    for w in watched:
        failures.update(w["failures"])
    return {
        "server": server.label,
        "notifications_per_s": round(notifications / window, 1),
        "publishes_per_s": round(published["ok"] / window, 1),
        "notifications_per_publish": round(notifications / published["ok"], 1) if published["ok"] else None,
        "observations": observations,
        "publishers": len(publishers),
        "watcher_devices": len(watchers),
        "per_server_cpu_s": round(notifications / window / server_cores, 1) if server_cores > 0 else None,
        "server_cpu_per_notification_ms": round(1000 * server_cores * window / notifications, 2)
        if notifications else None,
        "triggers_per_s": round(published["ok"] / window * len(watchers), 1),
        "publish_latency_ms": published["latency_ms"],
        "duplicate_notifications_received": sum(w["duplicates_received"] for w in watched),
        "udp_receive_buffer_drops_machine_wide": after.udp_drops - before.udp_drops,
        "failures": {**dict(failures), **published["failures"], **published["codes"]},
        "cpu_cores": {
            "server": round(server_cores, 2),
            "load_generators": round(loadgen_cores, 2),
            "redis": round(redis_cores, 2),
            "other_processes": round(foreign, 2),
            "machine_busy": round(machine_busy, 2),
        },
        "limited_by": _limits(server, server_cores, loadgen_cores, 1 + len(watcher_children), redis_cores, foreign,
                              machine_busy, f"{len(publishers)} publishers"),
        "note": "every publish triggers all its watchers' observations (triggers_per_s); aiocoap keeps only the "
                "latest state per observation, and a watcher observing several presentities from one address gets "
                "its CON notifications one at a time (NSTART 1), so publishes faster than notifications can be "
                "delivered are coalesced: notifications_per_s is the delivery rate, and the CPU per delivered "
                "notification includes work for superseded ones",
    }


# -- phase 2 and 3: memory per observation, fan-out -------------------------------------


async def fanout_phase(
    run: Run, server: Server, publishers: dict[int, Device], watchers: Sequence[Device]
) -> dict[str, Any]:
    """Memory per device context and per observation, then the fan-out times."""
    from aiocoap import CHANGED, GET, PUT, Message

    from gateway.core import codec
    from gateway.core.model import PresenceDocument, Status

    sizes = run.sizes
    largest = max(sizes.fanout)
    plan = []  # (device, presentities it watches)
    for index, device in enumerate(watchers[:largest]):
        plan.append((device, [publishers[n].user for n in sizes.fanout if index < n]))
    owners = {n: await LeanDevice.open(d.dir, d.user, ("127.0.0.1", server.port), random.Random(n))
              for n, d in publishers.items()}
    # The publishers speak first, so that code paths, caches and pools first used by a
    # request are not charged to the watchers.
    for n, device in owners.items():
        await device.request(Message(code=GET, uri_path=("p", publishers[n].user)))
    await asyncio.sleep(sizes.settle_s)
    pid = server.pids()[0]
    rss0 = rss_bytes(pid)
    children = []
    for index, part in enumerate(_split(plan, sizes.watcher_procs)):
        spec = {"role": "watcher", "port": server.port, "seed": 200 + index, "prefetch": True,
                "devices": [{"user": d.user, "dir": d.dir, "watch": w} for d, w in part]}
        children.append(await run.spawn_role(f"fanout-watch-{index}", spec))
    for child in children:
        await child.event("ready", 180, stage="contexts")
    await asyncio.sleep(sizes.settle_s / 2)
    rss1 = rss_bytes(pid)
    for child in children:
        child.send({"cmd": "observe"})
    observations = 0
    for child in children:
        observations += (await child.event("ready", 180, stage="observing"))["observations"]
    await asyncio.sleep(sizes.settle_s / 2)
    rss2 = rss_bytes(pid)
    run.progress.note(f"{len(plan)} watcher devices, {observations} observations; "
                      f"RSS {rss0 / 1e6:.1f} -> {rss1 / 1e6:.1f} -> {rss2 / 1e6:.1f} MB")

    times: dict[int, list[dict[str, Any]]] = {}
    back_to_back: list[dict[str, Any]] = []
    try:
        async def publish(n: int, tag: str) -> dict[str, Any]:
            doc = PresenceDocument(Status.OPEN, note=tag)
            inner = Message(code=PUT, uri_path=("p", publishers[n].user),
                            payload=codec.encode_presence(doc, for_publish=True), content_format=60)
            waiting = [c for c, part in zip(children, _split(plan, sizes.watcher_procs), strict=True)
                       if any(publishers[n].user in w for _, w in part)]
            cpu0, drops0 = cpu_seconds(pid), udp_drops()
            t0 = time.monotonic()
            response = await owners[n].request(inner)
            answered = time.monotonic()
            if response.code != CHANGED:
                raise RuntimeError(f"publish to {publishers[n].user} answered {response.code}")
            completions = [await child.event("complete", 30, tag=tag) for child in waiting]
            return {
                "fanout_s": round(max(c["last"] for c in completions) - t0, 4),
                "first_s": round(min(c["first"] for c in completions) - t0, 4),
                "publish_answered_s": round(answered - t0, 4),
                "notified": sum(c["n"] for c in completions),
                "gateway_cpu_s": round(cpu_seconds(pid) - cpu0, 3),
                "udp_receive_buffer_drops_machine_wide": udp_drops() - drops0,
            }

        for n in sizes.fanout:
            for rep in range(sizes.fanout_reps):
                row = await publish(n, f"fan:{n}:{rep}")
                times.setdefault(n, []).append(row)
                # Isolated publishes: when datagrams were dropped (ACKs of this publish's
                # notifications), wait until their retransmissions are over (the first
                # comes after ACK_TIMEOUT * up to 1.5 = 3 s), so the next publish does not
                # queue behind them (NSTART 1 per watcher).
                await asyncio.sleep(3.5 if row["udp_receive_buffer_drops_machine_wide"] else 0.3)
            run.progress.note(f"fan-out to {n} watcher(s), isolated publishes: " + ", ".join(
                f"{t['fanout_s'] * 1000:.0f} ms" for t in times[n]))
        # Back to back: the largest fan-out again, each publish 0.3 s after the last
        # watcher had the previous one.
        for rep in range(sizes.fanout_reps):
            back_to_back.append(await publish(largest, f"fan:{largest}:b{rep}"))
            await asyncio.sleep(0.3)
        run.progress.note(f"fan-out to {largest} watcher(s), publishes 0.3 s apart: " + ", ".join(
            f"{t['fanout_s'] * 1000:.0f} ms" for t in back_to_back))
        rss3 = rss_bytes(pid)
    finally:
        for device in owners.values():
            device.close()
    for child in children:
        child.send({"cmd": "stop"})
    watched = [await c.event("result", 60) for c in children]
    for child in children:
        await run.stop(child)
    failures: Counter[str] = Counter()
    for w in watched:
        failures.update(w["failures"])
    devices = len(plan)

    def stats(reps: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "median_s": round(statistics.median(t["fanout_s"] for t in reps), 4),
            "max_s": round(max(t["fanout_s"] for t in reps), 4),
            "first_notification_median_s": round(statistics.median(t["first_s"] for t in reps), 4),
            "publish_answered_median_s": round(statistics.median(t["publish_answered_s"] for t in reps), 4),
            # CPU time is counted in 10 ms ticks: per notification only over enough of them.
            "gateway_cpu_per_notification_ms": round(
                1000 * sum(t["gateway_cpu_s"] for t in reps) / sum(t["notified"] for t in reps), 3)
            if sum(t["notified"] for t in reps) >= 200 else None,
            "udp_receive_buffer_drops_machine_wide": sum(t["udp_receive_buffer_drops_machine_wide"] for t in reps),
            "reps": reps,
        }

    fanout = {str(n): {"watchers": n, "mode": "isolated publishes", **stats(reps)} for n, reps in times.items()}
    if back_to_back:
        fanout[str(largest)]["back_to_back"] = {"mode": "publishes 0.3 s apart", **stats(back_to_back)}
    return {
        "fanout": fanout,
        "memory": {
            "gateway_rss_idle_MB": round(rss0 / 1e6, 2),
            "watcher_devices": devices,
            "per_device_context_B": round((rss1 - rss0) / devices) if devices else None,
            "observations": observations,
            "per_observation_B": round((rss2 - rss1) / observations) if observations else None,
            "notes_per_observation_B": NOTES_OBSERVATION_BYTES,
            "gateway_rss_after_fanout_MB": round(rss3 / 1e6, 2),
            "what_is_counted": "per device: the gateway's RSS delta after each watcher device's first request "
                               "(its OSCORE context loaded, one duplicate-cache entry); per observation: the RSS delta "
                               "after every observation was registered (observation state plus its request's "
                               "duplicate-cache entry), divided by their number",
        },
        "watcher_failures": dict(failures),
        "duplicate_notifications_received": sum(w["duplicates_received"] for w in watched),
    }


# -- phase 3b: bulk registration -------------------------------------------------------


def _db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def register_bulk(run: Run, store_url: str, count: int, label: str) -> dict[str, Any]:
    from gateway.core.ids import UserId
    from gateway.core.model import UserRecord
    from gateway.store import open_store

    store = await open_store(store_url)
    started = time.monotonic()
    last_note = started
    try:
        for first in range(0, count, 200):
            await asyncio.gather(*(
                store.add_user(UserRecord(UserId(f"bulk{i:06d}@{DOMAIN}")))
                for i in range(first, min(count, first + 200))
            ))
            if time.monotonic() - last_note > 5:
                last_note = time.monotonic()
                run.progress.note(f"{label}: {min(count, first + 200):,}/{count:,} registered")
    finally:
        await store.close()
    elapsed = time.monotonic() - started
    return {"entities": count, "seconds": round(elapsed, 2), "per_s": round(count / elapsed, 1)}


async def redis_info(url: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        memory = await client.info("memory")
        server = await client.info("server")
        return {"used_memory": int(memory["used_memory"]), "pid": int(server["process_id"])}
    finally:
        await client.aclose()


async def redis_reachable(url: str) -> bool:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return False
    client = aioredis.from_url(url)
    try:
        await asyncio.wait_for(client.ping(), 2)
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


# -- phase 4: the duplicate cache ------------------------------------------------------


def duplicate_cache(im: dict[str, dict[str, Any]], bounded: dict[str, Any] | None = None) -> dict[str, Any]:
    from aiocoap.numbers.constants import TransportTuning

    tuning = TransportTuning()
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], capture_output=True, text=True, cwd=str(ROOT),
        timeout=60, check=False,
    ).stdout
    words = ("lifetime", "exchange")
    knobs = [line.strip() for line in help_text.splitlines()
             if line.strip().startswith("--") and any(w in line.lower() for w in words)]
    lifetime = float(tuning.EXCHANGE_LIFETIME)
    out: dict[str, Any] = {
        "exchange_lifetime_s": lifetime,
        "derivation": (
            f"EXCHANGE_LIFETIME = MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY + PROCESSING_DELAY = "
            f"{tuning.MAX_TRANSMIT_SPAN:g} + 2 * {tuning.MAX_LATENCY:g} + {tuning.PROCESSING_DELAY:g} s; "
            f"MAX_TRANSMIT_SPAN = ACK_TIMEOUT {tuning.ACK_TIMEOUT:g} s"
            f" * (2**MAX_RETRANSMIT {tuning.MAX_RETRANSMIT} - 1) * ACK_RANDOM_FACTOR {tuning.ACK_RANDOM_FACTOR:g};"
            " PROCESSING_DELAY = ACK_TIMEOUT (RFC 7252 4.8.2)"
        ),
        "what_is_held": "every incoming message's (remote, message id) and the response sent to it, plus a "
                        "timer handle, for EXCHANGE_LIFETIME (aiocoap MessageManager._recent_messages); the "
                        "timer uses the incoming message's tuning, which is always aiocoap's global default",
        "gateway_knob": knobs[0] if knobs else None,
        "gateway_knob_note": (
            "the gateway exposes no setting: it uses aiocoap's global TransportTuning, so EXCHANGE_LIFETIME is "
            f"{lifetime:g} s; shortening it means patching aiocoap's global TransportTuning (MAX_LATENCY, ACK_TIMEOUT, "
            "MAX_RETRANSMIT), which also changes retransmission timing"
        ) if not knobs else "see gateway_knob",
        "notes_bytes_per_request": NOTES_DUP_CACHE_BYTES,
    }
    at_rate = {}
    for key, row in im.items():
        if not row or "rate_per_s" not in row or key == "bare_again":
            continue
        rate = row["rate_per_s"]
        measured = row.get("server_rss_growth_per_request_B")
        at_rate[key] = {
            "rate_per_s": rate,
            "entries_held": round(rate * lifetime),
            "held_MB_at_notes_2_1KB": round(rate * lifetime * NOTES_DUP_CACHE_BYTES / 1e6, 1),
            "measured_rss_growth_per_request_B": measured,
            "held_MB_at_measured_growth": round(rate * lifetime * measured / 1e6, 1) if measured else None,
        }
    out["at_measured_rates"] = at_rate
    if bounded:
        short = bounded["exchange_lifetime_s"]
        growth = bounded.get("server_rss_growth_per_request_B")
        out["bounded"] = {
            "exchange_lifetime_s": short,
            "rate_per_s": bounded["rate_per_s"],
            "entries_held": round(bounded["rate_per_s"] * short),
            "measured_rss_growth_per_request_B": growth,
            "server_rss_end_MB": bounded.get("server_rss_end_MB"),
            "how": f"`serve --exchange-lifetime {short:g}` under the same IM load; entries made before the "
                   "measuring window expired within the warm-up, so the window shows the steady state",
        }
    return out


# -- targets ---------------------------------------------------------------------------


def bare_reference(im: dict[str, Any]) -> dict[str, Any] | None:
    """Bare aiocoap as measured before the gateways and, in the full run, again after
    them: the mean of both, so that a drift of the machine's load during the run does
    not favour or penalise the gateway."""
    rows = [im[k] for k in ("bare", "bare_again") if im.get(k)]
    if not rows:
        return None
    per_cpu = [r["per_server_cpu_s"] for r in rows if r.get("per_server_cpu_s")]
    return {
        "rate_per_s": round(statistics.mean(r["rate_per_s"] for r in rows), 1),
        "per_server_cpu_s": round(statistics.mean(per_cpu), 1) if per_cpu else None,
        "measurements": len(rows),
        "cpu_cores": rows[0]["cpu_cores"],
        "saturated": all(r["cpu_cores"]["per_server_process"] >= 0.85 for r in rows),
    }



def targets(results: dict[str, Any]) -> dict[str, Any]:
    im = results.get("im", {})
    ncpu = os.cpu_count() or 1
    out: dict[str, Any] = {}

    bare, one = bare_reference(im), im.get("gateway_1w")
    if bare and one:
        raw = one["rate_per_s"] / bare["rate_per_s"] if bare["rate_per_s"] else None
        per_cpu = (one["per_server_cpu_s"] / bare["per_server_cpu_s"]
                   if one.get("per_server_cpu_s") and bare.get("per_server_cpu_s") else None)
        target = TARGETS["gateway_vs_bare_im_rate"]
        if raw is None or per_cpu is None:
            status, why = "not measured", "a rate was zero"
        elif raw >= target and per_cpu >= target:
            status, why = "met", "both the side-by-side rate ratio and the per-server-CPU-second ratio reach the target"
        elif raw < target and per_cpu < target:
            status, why = "not met", "both the side-by-side rate ratio and the per-server-CPU-second ratio are below"
        else:
            status = "inconclusive"
            why = ("the raw ratio and the per-server-CPU-second ratio disagree: on this machine the servers did not "
                   "get the same CPU (see cpu_cores and limited_by)")
        bare_saturated = bare["saturated"]
        sqlite = im.get("gateway_1w_sqlite")
        store_name = "Redis" if str(one["store"]).startswith("redis") else "SQLite"
        out["gateway_vs_bare_im_rate"] = {
            "target": f">= {target:.2f}",
            "measured_rate_ratio": round(raw, 3) if raw is not None else None,
            "measured_per_server_cpu_ratio": round(per_cpu, 3) if per_cpu is not None else None,
            "bare_server_cpu_saturated": bare_saturated,
            "status": status,
            "why": f"{why} (judged on the 1-worker gateway with the {store_name} store)",
            "sqlite_store_rate_ratio": round(sqlite["rate_per_s"] / bare["rate_per_s"], 3) if sqlite else None,
            "sqlite_store_per_server_cpu_ratio": round(sqlite["per_server_cpu_s"] / bare["per_server_cpu_s"], 3)
            if sqlite and sqlite.get("per_server_cpu_s") and bare.get("per_server_cpu_s") else None,
            "bare_reference": f"mean of {bare['measurements']} bare aiocoap measurement(s) (before and after the "
                              "gateway runs)",
            "bare_drift_over_the_run": results.get("bare_drift"),
        }
    else:
        out["gateway_vs_bare_im_rate"] = {"target": ">= 0.70", "status": "not measured", "why": "a phase failed"}

    two = im.get("gateway_2w")
    target = TARGETS["two_vs_one_worker_im_rate"]
    if one and two:
        raw = two["rate_per_s"] / one["rate_per_s"] if one["rate_per_s"] else None
        per_cpu = (two["per_server_cpu_s"] / one["per_server_cpu_s"]
                   if two.get("per_server_cpu_s") and one.get("per_server_cpu_s") else None)
        entry: dict[str, Any] = {
            "target": f">= {target:.1f}",
            "measured_rate_ratio": round(raw, 3) if raw is not None else None,
            "per_server_cpu_ratio": round(per_cpu, 3) if per_cpu is not None else None,
            "two_worker_cpu_cores": two["cpu_cores"]["server"],
            "one_worker_cpu_cores": one["cpu_cores"]["server"],
        }
        if per_cpu is not None:
            entry["projection_with_two_dedicated_cores"] = round(2 * per_cpu, 2)
        if ncpu < 4:
            entry["status"] = "unmeasurable on this machine"
            entry["why"] = (
                f"{ncpu} cores: two workers need two cores of their own while load generators, Redis and the "
                f"watchers need more; the 2-worker run got {two['cpu_cores']['server']:.2f} cores for its workers "
                f"(machine busy {two['cpu_cores']['machine_busy']:.2f} of {ncpu})."
            )
            if per_cpu is not None:
                entry["why"] += (
                    f" Each worker accepted {per_cpu:.2f}x as many IMs per CPU-second as the lone worker did; "
                    f"projection_with_two_dedicated_cores (2 x that = {2 * per_cpu:.2f}) is a projection, not a "
                    "measurement: it assumes nothing else limits, and CPU time measured while processes share "
                    "cores may be inflated by the sharing itself"
                )
        elif raw is not None:
            entry["status"] = "met" if raw >= target else "not met"
            entry["why"] = "measured side by side on this machine"
        else:
            entry["status"] = "not measured"
            entry["why"] = "the 1-worker rate was zero"
        out["two_vs_one_worker_im_rate"] = entry
    else:
        out["two_vs_one_worker_im_rate"] = {
            "target": f">= {target:.1f}", "status": "not measured",
            "why": results.get("skipped", {}).get("gateway_2w", "a phase failed"),
        }

    dup = results.get("duplicate_cache", {})
    bounded, default = dup.get("bounded"), dup.get("at_measured_rates", {}).get("gateway_1w")
    if bounded and default and default.get("measured_rss_growth_per_request_B") is not None \
            and bounded.get("measured_rss_growth_per_request_B") is not None:
        grew, held = default["measured_rss_growth_per_request_B"], bounded["measured_rss_growth_per_request_B"]
        met = dup.get("gateway_knob") is not None and held <= 0.25 * grew
        out["duplicate_cache_bounded"] = {
            "target": "sized",
            "measured_growth_B_per_request_default": grew,
            "measured_growth_B_per_request_sized": held,
            "status": "met" if met else "not met",
            "why": f"RSS growth per request with EXCHANGE_LIFETIME {dup['exchange_lifetime_s']:g} s (aiocoap's "
                   f"default, nothing expired within the window) against `--exchange-lifetime "
                   f"{bounded['exchange_lifetime_s']:g}` in steady state; met when the knob exists and the sized "
                   "growth is at most a quarter of the default's",
        }
    else:
        out["duplicate_cache_bounded"] = {"target": "sized", "status": "not measured", "why": "a phase failed"}

    fan = results.get("fanout", {}).get("1000")
    target = TARGETS["fanout_1000_s"]
    if fan:
        b2b = fan.get("back_to_back")
        isolated_ok = fan["max_s"] < target
        b2b_ok = b2b is None or b2b["max_s"] < target
        why = (f"judged on the slowest publish: isolated publishes (no retransmission pending) max {fan['max_s']} s "
               f"({'met' if isolated_ok else 'not met'})")
        if b2b is not None:
            why += f"; publishes 0.3 s apart max {b2b['max_s']} s ({'met' if b2b_ok else 'not met'})"
            if not b2b_ok and b2b["max_s"] > 2 * fan["median_s"]:
                why += (": ACKs of the previous publish's notifications dropped by the gateway's full UDP receive "
                        "buffer leave those exchanges open, and the next notification to the same watcher waits "
                        "for the retransmission (NSTART 1, ACK_TIMEOUT 2-3 s)")
        out["fanout_1000_s"] = {
            "target": f"< {target:.1f}",
            "measured_median_s": fan["median_s"],
            "measured_max_s": fan["max_s"],
            "measured_back_to_back_median_s": b2b["median_s"] if b2b else None,
            "measured_back_to_back_max_s": b2b["max_s"] if b2b else None,
            "status": "met" if isolated_ok and b2b_ok else "not met",
            "why": why,
        }
    else:
        out["fanout_1000_s"] = {
            "target": f"< {target:.1f}", "status": "not measured",
            "why": "this profile has fewer than 1,000 watchers" if results.get("fanout") else "the phase failed",
        }
    return out


# -- table and plot --------------------------------------------------------------------


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def table(results: dict[str, Any]) -> str:
    lines = []
    im = results.get("im", {})
    if im:
        reference = bare_reference(im)
        bare_rate = reference["rate_per_s"] if reference else None
        lines.append("IMs/s, OSCORE, CON (devices x one request in flight, measured side by side; 'vs bare' against "
                     "the mean of the bare runs; busy/other: cores busy in all / in processes not ours)")
        lines.append(f"  {'server':<34}{'IMs/s':>9}{'vs bare':>9}{'srv CPU':>9}{'per CPU-s':>11}"
                     f"{'p50 ms':>8}{'p99 ms':>8}{'busy':>6}{'other':>6}  limited by")
        for row in im.values():
            if not row:
                continue
            ratio = row["rate_per_s"] / bare_rate if bare_rate else None
            lines.append(
                f"  {row['server']:<34}{_fmt(row['rate_per_s']):>9}{_fmt(ratio, '.2f'):>9}"
                f"{_fmt(row['cpu_cores']['server'], '.2f'):>9}{_fmt(row['per_server_cpu_s']):>11}"
                f"{_fmt(row['latency_ms_p50'], '.1f'):>8}{_fmt(row['latency_ms_p99'], '.1f'):>8}"
                f"{_fmt(row['cpu_cores']['machine_busy'], '.2f'):>6}"
                f"{_fmt(row['cpu_cores']['other_processes'], '.2f'):>6}"
                f"  {row['limited_by'][0]}"
            )
    presence = results.get("presence", {})
    if presence:
        lines.append("")
        lines.append("Presence notifications/s (publishers PUT in a loop; every watcher observes every publisher)")
        for row in presence.values():
            lines.append(
                f"  {row['server']:<34}{_fmt(row['notifications_per_s']):>9} notif/s  "
                f"{_fmt(row['publishes_per_s']):>6} publishes/s  {row['observations']} observations  "
                f"srv CPU {row['cpu_cores']['server']:.2f}  {row['limited_by'][0]}"
            )
    fan = results.get("fanout", {})
    if fan:
        lines.append("")
        lines.append("Fan-out: one publish -> last watcher's notification (1 gateway worker, SQLite)")
        rows = list(fan.values())
        rows += [{**row["back_to_back"], "watchers": f"{row['watchers']} (0.3 s apart)"}
                 for row in fan.values() if "back_to_back" in row]
        for row in rows:
            lines.append(f"  {row['watchers']!s:>6} watchers: median {row['median_s'] * 1000:8.1f} ms, "
                         f"max {row['max_s'] * 1000:8.1f} ms, "
                         f"first after {row['first_notification_median_s'] * 1000:.1f} ms; gateway CPU "
                         f"{_fmt(row['gateway_cpu_per_notification_ms'], '.2f')} ms/notification; UDP buffer drops "
                         f"{row['udp_receive_buffer_drops_machine_wide']}")
    memory = results.get("memory", {})
    if memory:
        lines.append("")
        lines.append("Memory")
        lines.append(f"  gateway RSS idle {memory['gateway_rss_idle_MB']} MB; per device context "
                     f"{_fmt(memory['per_device_context_B'])} B; per observation {_fmt(memory['per_observation_B'])} B "
                     f"({memory['observations']} observations; notes: ~{NOTES_OBSERVATION_BYTES:,} B)")
    registration = results.get("registration", {})
    for name, row in registration.items():
        if not isinstance(row, dict) or "entities" not in row:
            continue
        extra = ""
        if "db_bytes_per_entity" in row:
            extra = (f"; DB {row['db_bytes_per_entity']:.0f} B/entity; gateway RSS delta "
                     f"{_fmt(row.get('gateway_rss_delta_per_entity_B'), '.1f')} B/entity")
        if "redis_used_memory_per_entity_B" in row:
            extra = f"; Redis used_memory {row['redis_used_memory_per_entity_B']:.0f} B/entity"
        lines.append(f"  register {row['entities']:,} entities ({name}): {row['seconds']} s, "
                     f"{row['per_s']:,.0f}/s{extra}")
    dup = results.get("duplicate_cache", {})
    if dup:
        lines.append("")
        lines.append(f"Duplicate cache: EXCHANGE_LIFETIME {dup['exchange_lifetime_s']:g} s "
                     f"(gateway knob: {dup['gateway_knob'] or 'none'})")
        for key, row in dup.get("at_measured_rates", {}).items():
            lines.append(f"  {key:<18} at {row['rate_per_s']:,.0f}/s holds {row['entries_held']:,} entries: "
                         f"{row['held_MB_at_notes_2_1KB']} MB at 2.1 KB each, "
                         f"{_fmt(row['held_MB_at_measured_growth'], '.1f')} MB at the measured "
                         f"{_fmt(row['measured_rss_growth_per_request_B'])} B/request")
        bounded = dup.get("bounded")
        if bounded:
            lines.append(f"  --exchange-lifetime {bounded['exchange_lifetime_s']:g}: at "
                         f"{bounded['rate_per_s']:,.0f}/s holds {bounded['entries_held']:,} entries; measured "
                         f"{_fmt(bounded['measured_rss_growth_per_request_B'])} B/request in steady state")
    tg = results.get("targets", {})
    if tg:
        lines.append("")
        lines.append("Targets")
        for name, row in tg.items():
            measured = {k: v for k, v in row.items() if k.startswith("measured")}
            shown = ", ".join(f"{k.removeprefix('measured_')} {v}" for k, v in measured.items())
            lines.append(f"  {name:<28} target {row['target']:<7} {shown:<60} {row['status'].upper()}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"Gateway throughput ({results['profile']} run, {os.cpu_count()} cores, loopback, OSCORE)")

    ax = axes[0][0]
    im = [row for row in results.get("im", {}).values() if row]
    if im:
        labels = [row["server"].replace(" (", "\n(") for row in im]
        xs = list(range(len(im)))
        ax.bar([x - 0.2 for x in xs], [row["rate_per_s"] for row in im], width=0.4, label="IMs/s (side by side)")
        ax.bar([x + 0.2 for x in xs], [row["per_server_cpu_s"] or 0 for row in im], width=0.4,
               label="IMs per server CPU-second")
        bare = bare_reference(results["im"])
        if bare:
            ax.axhline(bare["rate_per_s"] * TARGETS["gateway_vs_bare_im_rate"], color="grey", linestyle="--",
                       label="70% of bare aiocoap, IMs/s (target)")
            if bare["per_server_cpu_s"]:
                ax.axhline(bare["per_server_cpu_s"] * TARGETS["gateway_vs_bare_im_rate"], color="tab:orange",
                           linestyle=":", label="70% of bare aiocoap, per CPU-second")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.legend(fontsize=8)
    ax.set_title("Instant messages accepted (2.01)")
    ax.set_ylabel("per second")
    ax.grid(True, axis="y", alpha=0.3)

    ax = axes[0][1]
    presence = list(results.get("presence", {}).values())
    if presence:
        xs = list(range(len(presence)))
        ax.bar([x - 0.2 for x in xs], [row["notifications_per_s"] for row in presence], width=0.4,
               label="notifications/s")
        ax.bar([x + 0.2 for x in xs], [row["publishes_per_s"] for row in presence], width=0.4, label="publishes/s")
        ax.set_xticks(xs, [row["server"].replace(" (", "\n(") for row in presence], fontsize=8)
        ax.legend(fontsize=8)
    ax.set_title("Presence")
    ax.grid(True, axis="y", alpha=0.3)

    ax = axes[1][0]
    fan = results.get("fanout", {})
    if fan:
        ns = sorted(int(n) for n in fan)
        ax.plot(ns, [fan[str(n)]["median_s"] for n in ns], marker="o", label="median, to the last watcher (isolated)")
        ax.plot(ns, [fan[str(n)]["first_notification_median_s"] for n in ns], marker=".", linestyle=":",
                label="median, to the first watcher")
        for n in ns:
            ax.scatter([n] * len(fan[str(n)]["reps"]), [r["fanout_s"] for r in fan[str(n)]["reps"]], color="tab:blue",
                       alpha=0.4, s=12)
        for n in ns:
            b2b = fan[str(n)].get("back_to_back")
            if b2b:
                ax.scatter([n] * len(b2b["reps"]), [r["fanout_s"] for r in b2b["reps"]], color="tab:red", marker="x",
                           label="publishes 0.3 s apart")
        ax.axhline(TARGETS["fanout_1000_s"], color="grey", linestyle="--", label="target for 1,000 watchers")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("Fan-out: publish -> notification")
    ax.set_xlabel("watchers")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1][1]
    bars: list[tuple[str, float]] = []
    memory = results.get("memory", {})
    if memory.get("per_observation_B") is not None:
        bars.append(("per observation", memory["per_observation_B"]))
    if memory.get("per_device_context_B") is not None:
        bars.append(("per device\n(context)", memory["per_device_context_B"]))
    for key, row in results.get("duplicate_cache", {}).get("at_measured_rates", {}).items():
        if row.get("measured_rss_growth_per_request_B") is not None and key in ("bare", "gateway_1w"):
            bars.append((f"per request\n({key})", row["measured_rss_growth_per_request_B"]))
    bounded = results.get("duplicate_cache", {}).get("bounded")
    if bounded and bounded.get("measured_rss_growth_per_request_B") is not None:
        bars.append((f"per request\n(lifetime {bounded['exchange_lifetime_s']:g} s)",
                     bounded["measured_rss_growth_per_request_B"]))
    for row in results.get("registration", {}).values():
        if isinstance(row, dict) and row.get("db_bytes_per_entity") is not None:
            bars.append(("per entity\n(SQLite file)", row["db_bytes_per_entity"]))
        if isinstance(row, dict) and row.get("redis_used_memory_per_entity_B") is not None:
            bars.append(("per entity\n(Redis)", row["redis_used_memory_per_entity_B"]))
    if bars:
        ax.bar(range(len(bars)), [max(1.0, b[1]) for b in bars], color="tab:green")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.set_yscale("log")
        for x, (_, value) in enumerate(bars):
            ax.annotate(f"{value:,.0f} B", (x, max(1.0, value)), ha="center", va="bottom", fontsize=7)
    ax.set_title("Memory and storage (bytes)")
    ax.grid(True, axis="y", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run ---------------------------------------------------------------------------


async def _phase(results: dict[str, Any], name: str, work: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await work()
    except Exception as exc:
        results.setdefault("errors", []).append({"phase": name, "error": f"{type(exc).__name__}: {exc}"})
        print(f"phase {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return None


async def run_benchmark(sizes: Sizes, out: Path, redis_url: str | None, keep: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="impp-bench-"))
    have_redis = redis_url is not None and await redis_reachable(redis_url)
    steps = 7 + ((5 + (1 if sizes.sqlite_im else 0)) if have_redis else 2) + (1 if sizes.bare_again else 0)
    progress = Progress(steps)
    run = Run(work, redis_url if have_redis else None, sizes, progress)
    results: dict[str, Any] = {
        "benchmark": "throughput",
        "profile": sizes.name,
        "sizes": asdict(sizes),
        "machine": {"cores": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "redis": redis_url if have_redis else None,
        "load_generator": "LeanDevice (aiocoap message codec + FilesystemSecurityContext, CON, one request in "
                          "flight per device, one UDP socket per device)",
        "im": {},
        "presence": {},
        "skipped": {},
    }
    started = time.monotonic()
    try:
        if have_redis:
            run.redis_pid = (await redis_info(run.redis_url)).get("pid")  # type: ignore[arg-type]
            if run.redis_pid and not Path(f"/proc/{run.redis_pid}").exists():
                run.redis_pid = None
        else:
            reason = f"no Redis reachable at {redis_url}: 2 workers need its store and event bus"
            results["skipped"]["gateway_2w"] = reason
            progress.note(reason + "; the 1-worker gateway uses SQLite")

        progress.step("provisioning OSCORE contexts")
        largest = max(sizes.fanout)
        im_users = [f"im{i}@{DOMAIN}" for i in range(sizes.im_devices)]
        peers = {u: im_users[(i + 1) % len(im_users)] for i, u in enumerate(im_users)}
        pp_users = [f"pp{i}@{DOMAIN}" for i in range(sizes.presence_publishers)]
        pw_users = [f"pw{i}@{DOMAIN}" for i in range(sizes.presence_watchers)]
        fan_users = {n: f"fan{n}@{DOMAIN}" for n in sizes.fanout}
        fw_users = [f"fw{i}@{DOMAIN}" for i in range(largest)]
        t0 = time.monotonic()
        bare_devices = await asyncio.to_thread(provision, work / "bare-keys", work / "bare-devices", im_users)
        gw_keys = work / "gw-keys"
        gw_devices = await asyncio.to_thread(
            provision, gw_keys, work / "gw-devices", [*im_users, *pp_users, *pw_users, *fan_users.values(), *fw_users]
        )
        all_users = list(gw_devices)
        progress.note(f"{len(bare_devices) + len(gw_devices)} contexts in {time.monotonic() - t0:.1f} s")

        # 1. IMs/s side by side.
        progress.step("bare aiocoap echo resource with OSCORE: IMs/s")

        async def bare_phase() -> dict[str, Any] | None:
            server = await start_bare(run, work / "bare-keys")
            try:
                return await im_phase(run, server, [bare_devices[u] for u in im_users], peers)
            finally:
                await run.stop(server.child)

        results["im"]["bare"] = await _phase(results, "im bare", bare_phase)

        async def gateway_phase(label: str, store: str, workers: int, bus: str | None, presence: bool,
                                key: str) -> None:
            server = await start_gateway(run, label, store, gw_keys, workers, bus)
            server.label = label
            try:
                before = await _stored_count(store)
                results["im"][key] = await im_phase(run, server, [gw_devices[u] for u in im_users], peers)
                after = await _stored_count(store)
                if before is not None and after is not None and results["im"][key]:
                    results["im"][key]["stored"] = after - before
                    results["im"][key]["stored_equals_accepted"] = after - before == results["im"][key]["ok_total"]
                if presence:
                    progress.step(f"{label}: presence notifications/s")
                    results["presence"][key] = await _phase(results, f"presence {key}", lambda: presence_phase(
                        run, server, [gw_devices[u] for u in pp_users], [gw_devices[u] for u in pw_users]))
            finally:
                await run.stop(server.child)
            if store.startswith("sqlite:") and results["im"].get(key):
                stored = _sqlite_count(Path(store.removeprefix("sqlite:")))
                results["im"][key]["stored"] = stored
                results["im"][key]["stored_equals_accepted"] = stored == results["im"][key]["ok_total"]

        if have_redis:
            assert run.redis_url is not None
            base = run.redis_url.split("?")[0]
            store = f"{base}?prefix={run.prefix('store')}"
            bus = f"{base}?channel=impp:bench:{run.run_id}:events"
            await register_users(store, all_users)
            progress.step("gateway, 1 worker (Redis store): IMs/s")
            await _phase(results, "gateway 1 worker", lambda: gateway_phase(
                "gateway 1 worker (Redis)", store, 1, None, True, "gateway_1w"))
            progress.step("gateway, 2 workers (Redis store + bus, SO_REUSEPORT): IMs/s")
            await _phase(results, "gateway 2 workers", lambda: gateway_phase(
                "gateway 2 workers (Redis)", store, 2, bus, True, "gateway_2w"))
        if sizes.sqlite_im or not have_redis:
            db = work / "gw-im.db"
            await register_users(f"sqlite:{db}", all_users)
            key = "gateway_1w_sqlite" if have_redis else "gateway_1w"
            progress.step("gateway, 1 worker (SQLite store, the default): IMs/s")
            await _phase(results, "gateway 1 worker sqlite", lambda: gateway_phase(
                "gateway 1 worker (SQLite)", f"sqlite:{db}", 1, None, not have_redis, key))
        # 1b. The duplicate cache sized to the deployment: the same IM load on a gateway
        # whose entries expire within the warm-up, so the window shows the steady state.
        lifetime = max(1.0, sizes.warmup_s)
        progress.step(f"gateway, 1 worker, --exchange-lifetime {lifetime:g}: RSS growth per request")

        async def bounded_phase() -> dict[str, Any]:
            bounded_store = store if have_redis else f"sqlite:{db}"
            server = await start_gateway(run, "gateway-short-lifetime", bounded_store, gw_keys,
                                         extra=("--exchange-lifetime", f"{lifetime:g}"))
            server.label = f"gateway 1 worker, lifetime {lifetime:g} s"
            try:
                row = await im_phase(run, server, [gw_devices[u] for u in im_users], peers)
            finally:
                await run.stop(server.child)
            row["exchange_lifetime_s"] = lifetime
            return row

        bounded = await _phase(results, "duplicate cache bounded", bounded_phase)
        if sizes.bare_again:
            progress.step("bare aiocoap again (has the machine's load drifted since the first measurement?)")
            again = await _phase(results, "im bare again", bare_phase)
            if again:
                again["server"] = "bare aiocoap echo (again)"
                results["im"]["bare_again"] = again
                if results["im"].get("bare"):
                    results["bare_drift"] = round(again["rate_per_s"] / results["im"]["bare"]["rate_per_s"], 3)

        # 2 + 3. Fan-out and memory on a fresh gateway (SQLite, the default store).
        progress.step(f"fan-out to {', '.join(str(n) for n in sizes.fanout)} watchers; memory per observation")
        fan_db = work / "gw-fanout.db"
        await register_users(f"sqlite:{fan_db}", all_users)
        fan_server: Server | None = None

        async def fan_phase() -> None:
            nonlocal fan_server
            fan_server = await start_gateway(run, "gateway-fanout", f"sqlite:{fan_db}", gw_keys)
            fan_server.label = "gateway 1 worker (SQLite)"
            measured = await fanout_phase(run, fan_server, {n: gw_devices[u] for n, u in fan_users.items()},
                                          [gw_devices[u] for u in fw_users])
            results["fanout"] = measured["fanout"]
            results["memory"] = measured["memory"]
            results["memory"]["watcher_failures"] = measured["watcher_failures"]
            results["fanout_duplicate_notifications_received"] = measured["duplicate_notifications_received"]

        await _phase(results, "fan-out", fan_phase)

        # 3b. Bulk registration: SQLite (into the running gateway's database) and Redis.
        progress.step(f"registering {sizes.register:,} entities in bulk (SQLite)")
        registration: dict[str, Any] = {}

        async def sqlite_registration() -> None:
            pid = fan_server.pids()[0] if fan_server is not None else None
            rss_before = rss_bytes(pid) if pid else 0
            db_before = _db_bytes(fan_db)
            row = await register_bulk(run, f"sqlite:{fan_db}", sizes.register, "SQLite")
            db_after = _db_bytes(fan_db)
            row["db_bytes_before"] = db_before
            row["db_bytes_after"] = db_after
            row["db_bytes_per_entity"] = round((db_after - db_before) / sizes.register, 1)
            if pid and fan_server is not None:
                check = await _fetch_presence(fan_server.port, gw_devices[fan_users[sizes.fanout[0]]],
                                              f"bulk{sizes.register - 1:06d}@{DOMAIN}")
                rss_after = rss_bytes(pid)
                row["gateway_rss_before_MB"] = round(rss_before / 1e6, 2)
                row["gateway_rss_after_MB"] = round(rss_after / 1e6, 2)
                row["gateway_rss_delta_per_entity_B"] = round((rss_after - rss_before) / sizes.register, 2)
                row["gateway_sees_last_entity"] = check
                row["note"] = ("registered through the store API into the database of the running gateway; the "
                               "gateway keeps nothing per registered entity in memory until it is used")
            registration["sqlite"] = row

        await _phase(results, "registration sqlite", sqlite_registration)
        if fan_server is not None:
            await run.stop(fan_server.child)
        if have_redis:
            assert run.redis_url is not None
            progress.step(f"registering {sizes.register:,} entities in bulk (Redis)")

            async def redis_registration() -> None:
                assert run.redis_url is not None
                info_before = await redis_info(run.redis_url)
                rss_before = rss_bytes(run.redis_pid) if run.redis_pid else 0
                base = run.redis_url.split("?")[0]
                row = await register_bulk(run, f"{base}?prefix={run.prefix('bulk')}", sizes.register, "Redis")
                info_after = await redis_info(run.redis_url)
                rss_after = rss_bytes(run.redis_pid) if run.redis_pid else 0
                row["redis_used_memory_per_entity_B"] = round(
                    (info_after["used_memory"] - info_before["used_memory"]) / sizes.register, 1)
                row["redis_rss_delta_per_entity_B"] = round((rss_after - rss_before) / sizes.register, 1) \
                    if run.redis_pid else None
                row["note"] = "Redis is shared with other users of this server: used_memory deltas include theirs"
                registration["redis"] = row

            await _phase(results, "registration redis", redis_registration)
        results["registration"] = registration

        # 4. The duplicate cache.
        progress.step("duplicate cache: EXCHANGE_LIFETIME and memory at the measured rates")
        results["duplicate_cache"] = duplicate_cache(results["im"], bounded)
    finally:
        await run.stop_all()
        try:
            results["redis_keys_deleted"] = await run.delete_redis_keys()
        except Exception as exc:
            results.setdefault("errors", []).append({"phase": "cleanup", "error": repr(exc)})
        if keep:
            results["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    results["ratios"] = _ratios(results)
    results["targets"] = targets(results)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "throughput.png"
    results["files"] = {"json": str(out / "throughput.json"), "png": str(png)}
    progress.step(f"writing {png}")
    try:
        plot(results, png)
    except Exception as exc:
        results.setdefault("errors", []).append({"phase": "plot", "error": f"{type(exc).__name__}: {exc}"})
        results["files"]["png"] = None
    (out / "throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    im = dict(results.get("im", {}))
    im["bare_reference"] = bare_reference(im)

    def ratio(a: str, b: str, field_name: str) -> float | None:
        x, y = im.get(a), im.get(b)
        if not x or not y or not x.get(field_name) or not y.get(field_name):
            return None
        return round(x[field_name] / y[field_name], 3)

    return {
        "bare_reference": im["bare_reference"],
        "gateway_1w_vs_bare": ratio("gateway_1w", "bare_reference", "rate_per_s"),
        "gateway_1w_vs_bare_per_server_cpu": ratio("gateway_1w", "bare_reference", "per_server_cpu_s"),
        "gateway_2w_vs_1w": ratio("gateway_2w", "gateway_1w", "rate_per_s"),
        "gateway_2w_vs_1w_per_server_cpu": ratio("gateway_2w", "gateway_1w", "per_server_cpu_s"),
        "gateway_1w_sqlite_vs_bare": ratio("gateway_1w_sqlite", "bare_reference", "rate_per_s"),
        "gateway_1w_sqlite_vs_bare_per_server_cpu": ratio("gateway_1w_sqlite", "bare_reference", "per_server_cpu_s"),
        "bare_again_vs_bare": ratio("bare_again", "bare", "rate_per_s"),
    }


async def _stored_count(store: str) -> int | None:
    """Messages the store holds (Redis: its message counter); None for SQLite (read after)."""
    if not store.startswith("redis"):
        return None
    import redis.asyncio as aioredis

    from gateway.store.redis import parse_url

    url, prefix = parse_url(store)
    client = aioredis.from_url(url)
    try:
        value = await client.get(prefix + "seq")
        return int(value or 0)
    finally:
        await client.aclose()


def _sqlite_count(path: Path) -> int | None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return None


async def _fetch_presence(port: int, device: Device, presentity: str) -> bool:
    from aiocoap import CONTENT, GET, Message

    lean = await LeanDevice.open(device.dir, device.user, ("127.0.0.1", port), random.Random(7))
    try:
        response = await lean.request(Message(code=GET, uri_path=("p", presentity)))
        return bool(response.code == CONTENT)
    finally:
        lean.close()


def summary_line(results: dict[str, Any]) -> dict[str, Any]:
    """Everything but the per-repetition detail, for the closing JSON line."""
    line = json.loads(json.dumps(results))
    for row in line.get("fanout", {}).values():
        row.pop("reps", None)
        row.get("back_to_back", {}).pop("reps", None)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks throughput",
        description="IMs/s (gateway 1 and 2 workers vs bare aiocoap, OSCORE), presence notifications/s, fan-out "
                    "to 1/100/1,000 watchers, memory per observation and per entity, duplicate-cache cost",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for tests (figures meaningless)")
    parser.add_argument("--out", default="var/bench", help="where throughput.json and .png go (default var/bench)")
    parser.add_argument("--redis", default=os.environ.get("IMPP_TEST_REDIS", DEFAULT_REDIS),
                        help=f"Redis for the 2-worker gateway (store + bus), default {DEFAULT_REDIS}; 'none' to skip")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, keys, databases)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    redis_url = None if args.redis.lower() == "none" else args.redis
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    results = asyncio.run(run_benchmark(sizes, out, redis_url, args.keep))
    print(table(results))
    print(json.dumps(summary_line(results), separators=(",", ":")))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
