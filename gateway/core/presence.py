"""Theory of operation: presence state rules.

A presentity's document changes in three ways, all decided here from ``now``:
a publish (the publisher's fields replace the old ones; the gateway stamps time and
a new version), a lease running out (the device vanished without goodbye: CLOSED and
out of contact), and a lost link noticed by failed notifications (same result).
Every change increments ``version``; the version is the ETag, so a watcher or a
cache can tell whether it has the current document.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from .model import PresenceDocument, Status

DEFAULT_MAX_AGE = 60


def apply_publish(previous: PresenceDocument | None, published: PresenceDocument, now: int) -> PresenceDocument:
    return replace(
        published,
        timestamp=now,
        version=(previous.version if previous else 0) + 1,
        out_of_contact=False,
    )


def mark_out_of_contact(doc: PresenceDocument, now: int) -> PresenceDocument:
    """The presentity cannot be reached: CLOSED, flagged, contact fields kept."""
    return replace(doc, status=Status.CLOSED, out_of_contact=True, lease=None, timestamp=now, version=doc.version + 1)


def withdraw(doc: PresenceDocument | None, now: int) -> PresenceDocument:
    """A graceful goodbye: CLOSED, not out of contact."""
    base = doc if doc is not None else PresenceDocument()
    return replace(
        base, status=Status.CLOSED, out_of_contact=False, lease=None, timestamp=now, version=base.version + 1
    )


def lease_deadline(doc: PresenceDocument) -> int | None:
    if doc.lease is None or doc.out_of_contact:
        return None
    return doc.timestamp + doc.lease


def is_lease_expired(doc: PresenceDocument, now: int) -> bool:
    deadline = lease_deadline(doc)
    return deadline is not None and now >= deadline


def etag(doc: PresenceDocument) -> bytes:
    """The version as a minimal big-endian integer (1..8 bytes, RFC 7252 5.10.6)."""
    return doc.version.to_bytes(max(1, (doc.version.bit_length() + 7) // 8), "big")


def representation_etag(doc: PresenceDocument, body: bytes) -> bytes:
    """The ETag of one served representation: its version and two bytes of a hash of
    its body. Every representation carries the hash, so a politely blocked watcher's
    ETag looks like anyone's, and a filtered view never validates as the full one."""
    return etag(doc) + representation_tag(body)


def representation_tag(body: bytes) -> bytes:
    """Two bytes telling filtered representations of one version apart (ETags are at
    most 8 bytes, RFC 7252 5.10.6: a version of up to 6 bytes plus these two)."""
    return hashlib.blake2s(body, digest_size=2).digest()


def max_age(doc: PresenceDocument, now: int) -> int:
    """How long a cache may serve this document: the rest of its lease, else a minute."""
    deadline = lease_deadline(doc)
    if deadline is None:
        return DEFAULT_MAX_AGE
    return max(0, min(DEFAULT_MAX_AGE, deadline - now))
