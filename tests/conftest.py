"""Shared fixtures: a real gateway on a random loopback UDP port, real aiocoap clients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from gateway.app import Gateway
from gateway.core.ids import UserId
from gateway.core.model import UserRecord
from gateway.keys import KeyStore

ALICE = UserId("alice@example.org")
BOB = UserId("bob@example.org")
CAROL = UserId("carol@example.org")
INBOX_ONLY = UserId("desk@example.org")  # an inbox with no presentity (RFC 2779 2.1.2)
PRESENCE_ONLY = UserId("sensor@example.org")  # a presentity with no inbox
ADMIN = UserId("root@example.org")  # configured administrator


class ManualClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def start_gateway(db: Path, clock: Callable[[], float], **kwargs: object) -> Gateway:
    """A gateway with an OSCORE key store beside its database and root@ as administrator."""
    kwargs.setdefault("keys", KeyStore(db.parent / "keys"))
    kwargs.setdefault("admins", [ADMIN])
    kwargs.setdefault("bind", ("127.0.0.1", 0))
    gateway = await Gateway.start(
        store=f"sqlite:{db}",
        domains=["example.org"],
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
    for user in (ALICE, BOB, CAROL, ADMIN):
        await gateway.service.register(UserRecord(user))
    await gateway.service.register(UserRecord(INBOX_ONLY, has_presentity=False))
    await gateway.service.register(UserRecord(PRESENCE_ONLY, has_inbox=False))
    return gateway


@pytest.fixture
async def gateway(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Gateway]:
    gw = await start_gateway(tmp_path / "gw.db", clock, sweep_interval=0.05)
    yield gw
    await gw.close()


def keystore_of(gateway: Gateway) -> KeyStore:
    assert gateway.credentials is not None
    return gateway.credentials.keystore


async def provisioned_device(gateway: Gateway, user: UserId, devices_dir: Path) -> DeviceClient:
    """A new device of ``user`` with its own OSCORE context, as `gateway provision` makes it."""
    uri = f"coap://127.0.0.1:{gateway.port}"
    creds = keystore_of(gateway).provision(user, devices_dir, uri)
    return await DeviceClient.create(uri, user, timeout=10, credentials=creds.credentials_file)


@pytest.fixture
async def device(gateway: Gateway, tmp_path: Path) -> AsyncIterator[Callable[[UserId], Awaitable[DeviceClient]]]:
    """device(user): a new OSCORE-protected device of that user."""
    made: list[DeviceClient] = []

    async def make(user: UserId) -> DeviceClient:
        client = await provisioned_device(gateway, user, tmp_path / "devices")
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
async def anonymous(gateway: Gateway) -> AsyncIterator[Callable[[], Awaitable[DeviceClient]]]:
    """anonymous(): a device sending unprotected requests (no identity)."""
    made: list[DeviceClient] = []

    async def make() -> DeviceClient:
        client = await DeviceClient.create(f"coap://127.0.0.1:{gateway.port}", UserId("anonymous@invalid"), timeout=10)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


REDIS = os.environ.get("IMPP_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def redis_or_skip() -> None:
    """Redis must answer in CI; elsewhere a test that needs it is skipped."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS)
    try:
        await asyncio.wait_for(client.ping(), 2)
    except Exception:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS} is not reachable (CI must start it)")
        pytest.skip(f"Redis at {REDIS} is not reachable")
    finally:
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
