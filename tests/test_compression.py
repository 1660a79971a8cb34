"""zstd with trained dictionaries: codec rules, negotiation and fallback over real UDP."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import cbor2
import pytest
import zstandard
from aiocoap import Code

from device_sim.client import DeviceClient
from gateway.core import codec, compression
from gateway.core.compression import COMPRESSED_BASE, Dictionary, DictionaryRegistry
from gateway.core.errors import CodecError, UnsupportedContentFormat
from gateway.core.model import PresenceDocument, Status
from gateway.dictionaries import DICTIONARY_IDS, load_registry, train

from .conftest import ALICE, BOB, eventually

MakeDevice = Callable[..., Awaitable[DeviceClient]]
REGISTRY = load_registry()
PRESENCE = REGISTRY.newest_for("presence")
IM = REGISTRY.newest_for("im")


def test_shipped_dictionaries_load_with_their_ids() -> None:
    assert PRESENCE is not None and IM is not None
    assert {(d.message_class, d.version): d.dict_id for d in REGISTRY} == DICTIONARY_IDS
    assert PRESENCE.content_format == COMPRESSED_BASE + 1 and len(PRESENCE.data) <= 1024


def test_training_is_reproducible(tmp_path: Path) -> None:
    train.main(["--out", str(tmp_path)])
    shipped = Path(train.__file__).parent
    for name in ("presence-v1.zdict", "im-v1.zdict", "corpus-presence.cborseq", "corpus-im.cborseq"):
        assert (
            hashlib.sha256((tmp_path / name).read_bytes()).digest()
            == hashlib.sha256((shipped / name).read_bytes()).digest()
        ), name


def test_round_trip_magicless_and_smaller_for_typical_presence() -> None:
    assert PRESENCE is not None
    body = codec.encode_presence(PresenceDocument(Status.OPEN, note="in a meeting", lease=300), for_publish=True)
    packed = PRESENCE.compress(body)
    assert not packed.startswith(b"\x28\xb5\x2f\xfd")  # no zstd magic number on the wire
    assert len(packed) < len(body)
    assert PRESENCE.decompress(packed, 4096) == body


def test_compressed_only_when_smaller() -> None:
    assert IM is not None
    incompressible = bytes(range(40))
    payload, content_format = REGISTRY.encode_body(incompressible, IM.content_format)
    assert (payload, content_format) == (incompressible, compression.CBOR_CONTENT_FORMAT)
    assert REGISTRY.encode_body(b"\xa1\x00\x01", None) == (b"\xa1\x00\x01", 60)


def test_decompression_is_bounded_and_garbage_is_a_codec_error() -> None:
    assert PRESENCE is not None
    bomb = PRESENCE.compress(b"\x00" * 100_000)
    assert len(bomb) < 100
    with pytest.raises(CodecError, match="expands"):
        PRESENCE.decompress(bomb, 4096)
    with pytest.raises(CodecError):
        PRESENCE.decompress(b"\xff\xfe garbage", 4096)
    with pytest.raises(UnsupportedContentFormat):
        REGISTRY.decode_body(b"x", COMPRESSED_BASE + 99, 4096)
    with pytest.raises(UnsupportedContentFormat):
        REGISTRY.decode_body(b"x", 50, 4096)


def test_registry_refuses_duplicate_ids() -> None:
    data = REGISTRY.newest_for("im").data  # type: ignore[union-attr]
    registry = DictionaryRegistry([Dictionary(9, "x", 1, data)])
    with pytest.raises(ValueError):
        registry.add(Dictionary(9, "x", 2, data))


async def test_compressed_publish_and_notification_and_plain_client(device: MakeDevice) -> None:
    """A device with the dictionary publishes compressed and gets compressed
    notifications; one without it still gets plain CBOR from the same presentity."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device("carol@example.org")
    alice.enable_compression(REGISTRY)
    bob.enable_compression(REGISTRY)
    await alice.publish(PresenceDocument(Status.OPEN, note="in a meeting", lease=300))
    compressed = await bob.request(Code.GET, f"/p/{ALICE}", accept=COMPRESSED_BASE + 1)
    assert compressed.opt.content_format == COMPRESSED_BASE + 1
    plain = await carol.request(Code.GET, f"/p/{ALICE}")
    assert plain.opt.content_format == 60 and len(compressed.payload) < len(plain.payload)
    assert codec.decode_presence_view(REGISTRY.decode_body(compressed.payload, COMPRESSED_BASE + 1, 4096)) == (
        codec.decode_presence_view(plain.payload)
    )
    seen: list[PresenceDocument] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE):
            seen.append(doc)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(len(seen) == 1))
        assert seen[0].note == "in a meeting"
    finally:
        task.cancel()
    # IMs: the client compresses when it helps and reads compressed inbox batches
    long_text = "Wir sehen uns morgen früh am Bahnhof, bitte ruf mich an wenn du da bist. Danke!"
    await alice.send(BOB, long_text)
    assert [m.message.payload.decode() for m in (await bob.fetch_inbox()).messages] == [long_text]


async def _true(value: bool) -> bool:
    return value


async def test_unknown_dictionary_falls_back_to_plain(device: MakeDevice) -> None:
    """A device holding a dictionary the gateway lacks: 4.15 / 4.06, then plain CBOR."""
    alice = await device(ALICE)
    data = zstandard.train_dictionary(
        1024,
        [codec.encode_presence(PresenceDocument(Status.OPEN, note=f"n{i}"), for_publish=True) * 3 for i in range(400)],
    )
    foreign = DictionaryRegistry([Dictionary(77, "presence", 9, data.as_bytes())])
    alice.enable_compression(foreign)
    raw = await alice.request(Code.GET, f"/p/{ALICE}", accept=COMPRESSED_BASE + 77)
    assert raw.code == Code.NOT_ACCEPTABLE
    await alice.publish(PresenceDocument(Status.OPEN, note="falls back"))
    assert (await alice.fetch_presence(ALICE)).note == "falls back"
    assert "presence" in alice._refused


def test_presence_patch_round_trip_and_gap() -> None:
    from gateway.core.model import Contact

    old = PresenceDocument(
        Status.OPEN,
        note="in a meeting",
        contact=Contact(tel="+49 30 123456", email="a@b.org"),
        extensions={"battery": 80, "geo": [52.52, 13.4]},
        timestamp=1000,
        version=7,
    )
    new = PresenceDocument(
        Status.CLOSED, note=None, contact=old.contact, extensions=old.extensions, timestamp=1060, version=8
    )
    patch = codec.presence_patch(codec.encode_presence(old), codec.encode_presence(new), 7)
    assert patch is not None and len(patch) < len(codec.encode_presence(new)) / 2
    assert codec.apply_presence_patch(old, patch) == new
    stale = PresenceDocument(Status.OPEN, version=6)
    assert codec.apply_presence_patch(stale, patch) is None  # a gap: fetch the whole document
    with pytest.raises(CodecError, match="base"):
        codec.decode_presence(patch)  # a patch is never a publishable document


async def test_delta_notifications_and_resync_after_a_gap(device: MakeDevice) -> None:
    from gateway.core.model import Contact

    alice, bob = await device(ALICE), await device(BOB)
    rich = dict(
        contact=Contact(tel="+49 30 123456", email="alice@example.org", adr="Berlin"),
        extensions={"battery": 80, "geo": [52.52, 13.4]},
    )
    await alice.publish(PresenceDocument(Status.OPEN, note="here", **rich))  # type: ignore[arg-type]
    seen: list[PresenceDocument] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE, delta=True):
            seen.append(doc)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(len(seen) == 1))
        for note in ("one", "two"):
            await alice.publish(PresenceDocument(Status.OPEN, note=note, **rich))  # type: ignore[arg-type]
            await eventually(lambda n=note: _true(seen[-1].note == n))  # type: ignore[misc]
        assert seen[-1] == await bob.fetch_presence(ALICE)
        assert bob.resyncs == 0
        # On the wire: the notification is a patch (key 8) and smaller than the document.
        carol = await device("carol@example.org")
        from aiocoap import Message

        observation = carol.context.request(Message(code=Code.GET, uri=f"{carol.base}/p/{ALICE}?d", observe=0))
        full = await observation.response
        await alice.publish(PresenceDocument(Status.CLOSED, note="two", **rich))  # type: ignore[arg-type]
        notification = await asyncio.wait_for(observation.observation.__aiter__().__anext__(), 5)
        patch = cbor2.loads(notification.payload)
        assert patch[8] == codec.decode_presence_view(full.payload).version
        assert len(notification.payload) < len(full.payload) / 2
        observation.observation.cancel()
    finally:
        task.cancel()
