"""OSCORE security contexts (RFC 8613): provisioning, revocation, lookup by key id.

Each device gets its own pairwise context. The gateway side is an aiocoap
FilesystemSecurityContext directory ``<root>/<kid hex>/`` (settings, secret, and the
persisted sequence number and replay window, so a restart never reuses a nonce and
the replay window recovers through the Echo option, RFC 8613 B.1.2), plus
``owner.json`` naming the principal the context authenticates. The device side is a
directory of the same kind and a credentials file that ``aiocoap-client
--credentials`` accepts.

aiocoap's CredentialsMap finds a context by scanning every entry (0.8 ms at 10,000
contexts); :class:`KidIndexedCredentials` looks it up by key id in a dict instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore import COSE_KID, COSE_KID_CONTEXT, FilesystemSecurityContext

from .core.ids import Domain, UserId, parse_domain, parse_user_id

GATEWAY_SENDER_ID = b""  # the gateway's own ID: empty, so responses carry no kid byte
MASTER_SECRET_BYTES = 16
MASTER_SALT_BYTES = 8


@dataclass(frozen=True, slots=True)
class PeerClaim:
    """What a peer gateway's context authenticates: the gateway of ``domain``."""

    domain: Domain


def _kid_bytes(number: int) -> bytes:
    return number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")


def _write_private(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a provisioned device needs: its context directory and a credentials map."""

    user: UserId
    kid: bytes
    context_dir: Path
    credentials_file: Path

    def credentials_for(self, gateway_uri: str) -> dict[str, Any]:
        return {f"{gateway_uri.rstrip('/')}/*": {"oscore": {"basedir": f"{self.context_dir}/"}}}


class KeyStore:
    """Gateway-side contexts, one directory per device under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def context_dir(self, kid: bytes) -> Path:
        if not kid:
            raise KeyError("devices never have the empty key id (it is the gateway's)")
        return self.root / kid.hex()

    def _owner_record(self, kid: bytes) -> dict[str, Any]:
        try:
            data = json.loads((self.context_dir(kid) / "owner.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def owner_of(self, kid: bytes) -> UserId | None:
        """The principal a device context authenticates (None for a peer gateway's)."""
        user = self._owner_record(kid).get("user")
        return UserId(user) if isinstance(user, str) else None

    def peer_of(self, kid: bytes) -> Domain | None:
        """The domain whose gateway a peer context authenticates (None for a device's)."""
        peer = self._owner_record(kid).get("peer")
        return Domain(peer) if isinstance(peer, str) else None

    def peers(self) -> list[tuple[bytes, Domain]]:
        out = []
        for path in sorted(self.root.iterdir()):
            if _is_hex(path.name) and (peer := self.peer_of(bytes.fromhex(path.name))) is not None:
                out.append((bytes.fromhex(path.name), peer))
        return out

    def entries(self) -> list[tuple[bytes, UserId]]:
        out = []
        for path in sorted(self.root.iterdir()):
            try:
                kid = bytes.fromhex(path.name)
            except ValueError:
                continue
            owner = self.owner_of(kid)
            if owner is not None:
                out.append((kid, owner))
        return out

    def _free_kid(self) -> bytes:
        """The next key id never handed out before: a revoked id is never reused, so a
        gateway that still holds the revoked context cannot mistake a new device for it."""
        counter = self.root / "next-kid"
        try:
            number = int(counter.read_text())
        except (FileNotFoundError, ValueError):
            used = [int.from_bytes(bytes.fromhex(p.name), "big") for p in self.root.iterdir() if _is_hex(p.name)]
            number = max(used, default=-1) + 1
        while self.context_dir(_kid_bytes(number)).exists():
            number += 1
        temporary = counter.with_name("next-kid.tmp")
        temporary.write_text(str(number + 1))
        os.replace(temporary, counter)
        return _kid_bytes(number)

    def provision(self, user: UserId, device_dir: Path, gateway_uri: str) -> DeviceCredentials:
        """Create a new context for a device of ``user``; write the device's side to ``device_dir``."""
        user = parse_user_id(user)  # a context must never authenticate a malformed identity
        return self._provision({"user": user}, user, device_dir, gateway_uri)

    def provision_peer(self, domain: str, out_dir: Path, gateway_uri: str) -> DeviceCredentials:
        """Create a context for the gateway of another ``domain``: its requests to this
        gateway are authenticated as that domain's gateway, which may then speak for its
        own users, and for no one else (``gateway/federation.py``). Its side is written
        to ``out_dir`` like a device's, for ``serve --peer-credentials``."""
        peer = parse_domain(domain)
        return self._provision({"peer": peer}, f"gateway.{peer}", out_dir, gateway_uri)

    def _provision(self, owner: dict[str, str], label: str, device_dir: Path, gateway_uri: str) -> DeviceCredentials:
        kid = self._free_kid()
        secret = secrets.token_bytes(MASTER_SECRET_BYTES)
        salt = secrets.token_bytes(MASTER_SALT_BYTES)
        server_dir = self.context_dir(kid)
        server_dir.mkdir(mode=0o700)
        _write_private(
            server_dir / "secret.json",
            {
                "sender-id_hex": GATEWAY_SENDER_ID.hex(),
                "recipient-id_hex": kid.hex(),
                "secret_hex": secret.hex(),
                "salt_hex": salt.hex(),
            },
        )
        _write_private(server_dir / "owner.json", owner)
        client_dir = Path(device_dir).resolve() / f"{label}-{kid.hex()}"
        client_dir.mkdir(parents=True, mode=0o700)
        _write_private(
            client_dir / "secret.json",
            {
                "sender-id_hex": kid.hex(),
                "recipient-id_hex": GATEWAY_SENDER_ID.hex(),
                "secret_hex": secret.hex(),
                "salt_hex": salt.hex(),
            },
        )
        device = DeviceCredentials(UserId(label), kid, client_dir, client_dir.parent / f"{client_dir.name}.json")
        _write_private(device.credentials_file, device.credentials_for(gateway_uri))
        return device

    def revoke(self, user: UserId) -> list[bytes]:
        """Remove every context of ``user``; a running gateway stops accepting them at once."""
        revoked = [kid for kid, owner in self.entries() if owner == user]
        for kid in revoked:
            shutil.rmtree(self.context_dir(kid))
        return revoked


def _is_hex(name: str) -> bool:
    try:
        return bool(bytes.fromhex(name))
    except ValueError:
        return False


class KidIndexedCredentials(CredentialsMap):  # type: ignore[misc]
    """Server credentials found by key id, loaded on first use, dropped when revoked."""

    def __init__(self, keystore: KeyStore) -> None:
        super().__init__()
        self.keystore = keystore
        self._by_kid: dict[bytes, FilesystemSecurityContext] = {}
        self._owner_files: dict[bytes, str] = {}  # of the loaded contexts
        self._retired_owners: set[UserId] = set()  # revoked since the last revoked_owners()

    def find_oscore(self, unprotected: dict[int, Any]) -> FilesystemSecurityContext:
        kid = unprotected.get(COSE_KID)
        if not isinstance(kid, bytes) or not kid or unprotected.get(COSE_KID_CONTEXT) is not None:
            raise KeyError("no such context")
        context = self._by_kid.get(kid)
        if context is not None:
            # Revocation removes the directory: checked on every request (a stat).
            if os.path.exists(self._owner_files[kid]):
                return context
            self._retire(kid)
            raise KeyError("no such context")
        directory = self.keystore.context_dir(kid)
        if not (directory / "owner.json").exists():
            raise KeyError("no such context")
        owner: UserId | PeerClaim | None = self.keystore.owner_of(kid)
        if owner is None and (peer := self.keystore.peer_of(kid)) is not None:
            owner = PeerClaim(peer)
        if owner is None:
            raise KeyError("no such context")
        context = FilesystemSecurityContext(str(directory))
        context.authenticated_claims = [owner]
        self._by_kid[kid] = context
        self._owner_files[kid] = str(directory / "owner.json")
        return context

    def held_elsewhere(self, kid: bytes) -> bool:
        """Whether another process holds the lock of ``kid``'s context, which this
        process therefore cannot load (``coap/handoff.py``). Loads it otherwise."""
        if kid in self._by_kid:
            return False
        try:
            self.find_oscore({COSE_KID: kid})
        except filelock.Timeout:
            return True
        except Exception:
            return False  # no such context, or an unreadable one: find_oscore answers that
        return False

    def loaded(self, kid: bytes) -> FilesystemSecurityContext | None:
        return self._by_kid.get(kid)

    def let_go(self, kid: bytes) -> bool:
        """Persist ``kid``'s exact sequence number and replay window, make the loaded
        context unusable and release its lock, so another process can load it."""
        context = self._by_kid.pop(kid, None)
        self._owner_files.pop(kid, None)
        if context is None or context.lockfile is None:
            return False
        context._destroy()
        return True

    def revoked_owners(self) -> set[UserId]:
        """Forget cached contexts whose directory is gone; return whom they authenticated."""
        for kid in list(self._by_kid):
            if not os.path.exists(self._owner_files[kid]):
                self._retire(kid)
        owners, self._retired_owners = self._retired_owners, set()
        return owners

    def _retire(self, kid: bytes) -> None:
        context = self._by_kid[kid]
        self._retired_owners.update(UserId(c) for c in context.authenticated_claims if isinstance(c, str))
        # Its directory is gone, yet a last notification ("credentials revoked") may
        # still be protected with it: never try to persist again.
        context.sequence_number_persisted = context.sender_sequence_number + 2**20
        self._forget(kid)

    def _forget(self, kid: bytes) -> None:
        context = self._by_kid.pop(kid)
        self._owner_files.pop(kid, None)
        # Its directory is gone: there is nothing to persist and no lock to release
        # (aiocoap would try both when the object is collected).
        context.lockfile = None

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return {kid for kid, _ in self.keystore.entries()}

    def close(self) -> None:
        """Persist sequence numbers and release locks (as aiocoap does on collection)."""
        self.revoked_owners()  # nothing to persist for those
        for kid in list(self._by_kid):
            self.let_go(kid)
