"""OSCORE contexts: provisioning, key-id lookup, revocation, files a stock client accepts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from aiocoap.oscore import COSE_KID, COSE_KID_CONTEXT

from gateway.core.ids import UserId
from gateway.keys import KeyStore, KidIndexedCredentials

ALICE, BOB = UserId("alice@example.org"), UserId("bob@example.org")


def test_provision_gives_unique_short_kids_and_private_files(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "server")
    devices = [keys.provision(user, tmp_path / "devices", "coap://127.0.0.1:5683") for user in (ALICE, BOB, ALICE)]
    assert [d.kid for d in devices] == [b"\x00", b"\x01", b"\x02"]
    assert keys.entries() == [(b"\x00", ALICE), (b"\x01", BOB), (b"\x02", ALICE)]
    for device in devices:
        for path in (device.credentials_file, device.context_dir / "secret.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        creds = json.loads(device.credentials_file.read_text())
        assert creds == {"coap://127.0.0.1:5683/*": {"oscore": {"basedir": f"{device.context_dir}/"}}}
        client = json.loads((device.context_dir / "secret.json").read_text())
        server = json.loads((keys.context_dir(device.kid) / "secret.json").read_text())
        assert client["sender-id_hex"] == server["recipient-id_hex"] == device.kid.hex()
        assert client["secret_hex"] == server["secret_hex"] and len(bytes.fromhex(client["secret_hex"])) == 16


def test_lookup_by_kid_sets_identity_and_revocation_takes_effect(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "server")
    alice = keys.provision(ALICE, tmp_path / "devices", "coap://h")
    bob = keys.provision(BOB, tmp_path / "devices", "coap://h")
    creds = KidIndexedCredentials(keys)
    context = creds.find_oscore({COSE_KID: alice.kid})
    assert context.authenticated_claims == [ALICE]
    assert creds.find_oscore({COSE_KID: alice.kid}) is context  # cached
    assert creds.find_oscore({COSE_KID: bob.kid}).authenticated_claims == [BOB]
    for unknown in ({COSE_KID: b"\x99"}, {COSE_KID: b""}, {}, {COSE_KID: alice.kid, COSE_KID_CONTEXT: b"x"}):
        with pytest.raises(KeyError):
            creds.find_oscore(unknown)
    assert keys.revoke(ALICE) == [alice.kid]
    with pytest.raises(KeyError):
        creds.find_oscore({COSE_KID: alice.kid})
    assert creds.find_oscore({COSE_KID: bob.kid}).authenticated_claims == [BOB]
    creds.close()
    assert json.loads((keys.context_dir(bob.kid) / "sequence.json").read_text())["next-to-send"] == 0
