"""Codec: vectors whole, byte by byte and with trailing junk; round trips; garbage."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import codec
from gateway.core.errors import CodecError, PayloadTooLarge
from gateway.core.model import Contact, InstantMessage, MessageId, PresenceDocument, Status

# {0: 1, 1: "hi", 6: 30}: OPEN, note "hi", 30 s lease
PRESENCE_VECTOR = bytes.fromhex("a3 00 01 01 62 6869 06 18 1e")
# {0: h'01', 1: "a@x.org", 5: h'6869'}: IM id 01 from a@x.org, payload "hi"
MESSAGE_VECTOR = bytes.fromhex("a3 00 41 01 01 67 6140782e6f7267 05 42 6869")


def test_presence_vector_whole() -> None:
    doc = codec.decode_presence(PRESENCE_VECTOR)
    assert doc == PresenceDocument(status=Status.OPEN, note="hi", lease=30)
    assert codec.encode_presence(doc, for_publish=True) == PRESENCE_VECTOR


def test_message_vector_whole() -> None:
    # The recipient is not in the body: the inbox path names it.
    msg = codec.decode_message(MESSAGE_VECTOR, recipient="b@x.org")  # type: ignore[arg-type]
    assert msg == InstantMessage(MessageId(b"\x01"), "a@x.org", "b@x.org", b"hi")  # type: ignore[arg-type]
    assert codec.encode_message(msg) == MESSAGE_VECTOR


@pytest.mark.parametrize("vector", [PRESENCE_VECTOR, MESSAGE_VECTOR])
def test_every_truncation_and_trailing_junk_is_rejected(vector: bytes) -> None:
    decode = codec.decode_presence if vector is PRESENCE_VECTOR else (lambda b: codec.decode_message(b, "b@x.org"))  # type: ignore[arg-type]
    for cut in range(len(vector)):
        with pytest.raises(CodecError):
            decode(vector[:cut])
    with pytest.raises(CodecError, match="trailing"):
        decode(vector + b"\x00")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({1: "no status"}, "status"),
        ({0: 2}, "status"),
        ({0: True}, "status"),
        ({0: 1, 1: 5}, "note"),
        ({0: 1, 1: "x" * 300}, "note"),
        ({0: 1, 99: 1}, "unknown key"),
        ({0: 1, 6: 0}, "lease"),
        ({0: 1, 2: {0: 1}}, "tel"),
        ({0: 1, 3: {"k": float("nan")}}, "non-finite"),
        ({0: 1, 3: {i: i for i in range(20)}}, "entries"),
        ([0, 1], "map expected"),
    ],
)
def test_presence_validation(body: object, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        codec.decode_presence(cbor2.dumps(body))


def test_duplicate_keys_rejected() -> None:
    with pytest.raises(CodecError):
        codec.decode_presence(bytes.fromhex("a200010000"))


def test_oversize_body_and_payload() -> None:
    with pytest.raises(PayloadTooLarge):
        codec.decode_presence(b"\xa0" * (codec.MAX_BODY + 1))
    big = cbor2.dumps({0: b"1", 1: "a@x.org", 5: b"x" * (codec.MAX_IM_PAYLOAD + 1)})
    with pytest.raises(PayloadTooLarge):
        codec.decode_message(big, "b@x.org")  # type: ignore[arg-type]


def test_message_recipient_must_match_path() -> None:
    body = cbor2.dumps({0: b"1", 1: "a@x.org", 2: "c@x.org", 5: b""})
    with pytest.raises(CodecError, match="differs"):
        codec.decode_message(body, "b@x.org")  # type: ignore[arg-type]


def test_unknown_extension_keys_survive_round_trip() -> None:
    ext = {"geo": [52.5, 13.4], 700: {"battery": 81, "x": b"\x00"}, -3: None}
    doc = codec.decode_presence(cbor2.dumps({0: 1, 3: ext}))
    assert codec.decode_presence_view(codec.encode_presence(doc)).extensions == ext


texts = st.text(max_size=40)
contacts = st.builds(
    Contact, tel=st.none() | texts, email=st.none() | texts, url=st.none() | texts, adr=st.none() | texts
)
ext_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.integers(0, 100) | st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=200)
@given(
    status=st.sampled_from(Status),
    note=st.none() | st.text(max_size=256),
    contact=contacts,
    ext=st.dictionaries(st.integers(-100, 100) | st.text(max_size=8), ext_values, max_size=4),
    lease=st.none() | st.integers(1, codec.MAX_LEASE),
)
def test_presence_round_trip(status: Status, note: str | None, contact: Contact, ext: dict, lease: int | None) -> None:  # type: ignore[type-arg]
    doc = PresenceDocument(status=status, note=note, contact=contact, extensions=ext, lease=lease)
    encoded = codec.encode_presence(doc, for_publish=True)
    if len(cbor2.dumps(ext)) > codec.MAX_EXT_BYTES:
        with pytest.raises(CodecError):
            codec.decode_presence(encoded)
        return
    assert codec.decode_presence(encoded) == doc


@settings(max_examples=200)
@given(
    msg_id=st.binary(min_size=1, max_size=16),
    payload=st.binary(max_size=codec.MAX_IM_PAYLOAD),
    content_format=st.integers(0, 65535),
    ttl=st.none() | st.integers(0, codec.MAX_TTL),
)
def test_message_round_trip(msg_id: bytes, payload: bytes, content_format: int, ttl: int | None) -> None:
    msg = InstantMessage(MessageId(msg_id), "a@x.org", "b@x.org", payload, content_format, ttl=ttl)  # type: ignore[arg-type]
    assert codec.decode_message(codec.encode_message(msg), "b@x.org") == msg  # type: ignore[arg-type]


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_raises_only_codec_errors(data: bytes) -> None:
    for decode in (codec.decode_presence, lambda b: codec.decode_message(b, "b@x.org"), codec.decode_records):  # type: ignore[arg-type]
        try:
            decode(data)
        except (CodecError, PayloadTooLarge):
            pass
