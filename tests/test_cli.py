"""The command line, run as an operator runs it: ``python -m gateway user|provision|revoke|serve``
and ``python -m device_sim demo``, as real processes, over a real SQLite store, real key
files and real UDP. Devices are OSCORE principals; unprotected requests are anonymous."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message
from aiocoap.oscore import NotAProtectedMessage

from device_sim.client import DeviceClient
from gateway.core import codec
from gateway.core.access import DEFAULT_RULES
from gateway.core.ids import UserId
from gateway.core.model import PresenceDocument, Status

REPO = Path(__file__).resolve().parent.parent
ALICE, BOB, CAROL = UserId("alice@example.org"), UserId("bob@example.org"), UserId("carol@example.org")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'gw.db'}"


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_user_add_list_remove(store: str, tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")  # `user remove` revokes the user's OSCORE contexts there
    added = gateway_cli("user", "add", "--store", store, "alice@example.org", "bob@example.org")
    assert (added.returncode, lines(added.stdout)) == (
        0, ["added alice@example.org (example.org)", "added bob@example.org (example.org)"]
    ), added.stderr
    inbox_only = gateway_cli("user", "add", "--no-presence", "--store", store, "desk@example.org")
    assert (inbox_only.returncode, inbox_only.stdout) == (0, "added desk@example.org (example.org)\n")
    # The domain part is case-insensitive and stored normalised.
    presence_only = gateway_cli("user", "add", "--no-inbox", "--store", store, "sensor@Example.ORG")
    assert (presence_only.returncode, presence_only.stdout) == (0, "added sensor@example.org (example.org)\n")
    again = gateway_cli("user", "add", "--store", store, "alice@example.org")
    assert (again.returncode, again.stdout) == (0, "updated alice@example.org (example.org)\n")

    listed = gateway_cli("user", "list", "--store", store)
    assert (listed.returncode, lines(listed.stdout)) == (
        0,
        [
            "alice@example.org\tpresence,inbox",
            "bob@example.org\tpresence,inbox",
            "desk@example.org\tinbox",
            "sensor@example.org\tpresence",
        ],
    )

    provision(BOB, store, Path(keys), tmp_path / "devices", "coap://127.0.0.1:5683")
    removed = gateway_cli("user", "remove", "--store", store, "--keys", keys, "bob@example.org")
    assert (removed.returncode, removed.stdout) == (0, "removed bob@example.org, revoked 1 key(s)\n")
    assert contexts(Path(keys)) == []
    gone = gateway_cli("user", "remove", "--store", store, "--keys", keys, "bob@example.org")
    assert (gone.returncode, gone.stdout) == (0, "no such user bob@example.org\n")
    listed = gateway_cli("user", "list", "--store", store)
    assert [line.split("\t")[0] for line in lines(listed.stdout)] == [
        "alice@example.org", "desk@example.org", "sensor@example.org"
    ]
    for result in (added, inbox_only, presence_only, again, listed, removed, gone):
        assert "Traceback" not in result.stderr and "error" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("not-an-id", "identifier must be user@domain"),
        ("alice@bad_domain.org", "bad domain"),
        ("bad user@example.org", "bad user part"),
        ("a" * 70 + "@example.org", "identifier too long"),
    ],
)
@pytest.mark.parametrize("action", ["add", "remove"])
def test_bad_identifier_exits_2_with_a_message(store: str, action: str, identifier: str, message: str) -> None:
    result = gateway_cli("user", action, "--store", store, identifier)
    assert result.returncode == 2
    assert result.stderr == f"error: {message}\n"
    assert result.stdout == ""


@pytest.mark.parametrize("identifier", ["eve@example.org\n", "eve\n@example.org"])
def test_identifier_with_a_newline_is_refused(store: str, identifier: str) -> None:
    """'$' in the identifier patterns matches before a trailing newline."""
    result = gateway_cli("user", "add", "--store", store, identifier)
    listed = gateway_cli("user", "list", "--store", store)
    assert (result.returncode, listed.stdout) == (2, ""), f"stored {listed.stdout!r}"
    assert result.stderr.startswith("error: ")


def test_failed_user_add_changes_nothing(store: str) -> None:
    """Exit 2 means the command did not happen: no user of the list is added."""
    result = gateway_cli("user", "add", "--store", store, "good@example.org", "not-an-id")
    assert (result.returncode, result.stderr) == (2, "error: identifier must be user@domain\n")
    listed = gateway_cli("user", "list", "--store", store)
    assert listed.stdout == "", f"stored although the command failed: {listed.stdout!r}"


def test_usage_errors_exit_2(store: str) -> None:
    for args in (("user",), ("user", "add", "--store", store), ("frobnicate",)):
        result = gateway_cli(*args)
        assert result.returncode == 2 and "usage:" in result.stderr, args


# -- OSCORE provisioning ---------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    user: str
    kid: str  # hex
    context_dir: Path
    credentials: Path


def provision(user: str, store: str, keys: Path, devices: Path, base: str) -> Provisioned:
    """`provision` as an operator runs it; checks its exit code and its three lines of output."""
    result = gateway_cli(
        "provision", user, "--store", store, "--keys", str(keys), "--out", str(devices), "--gateway", base
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    first = re.fullmatch(rf"provisioned {re.escape(user)}: key id ([0-9a-f]{{2,}})", lines(result.stdout)[0])
    assert first, result.stdout
    kid = first.group(1)
    device = Provisioned(user, kid, (devices / f"{user}-{kid}").resolve(), (devices / f"{user}-{kid}.json").resolve())
    assert lines(result.stdout) == [
        f"provisioned {user}: key id {kid}",
        f"device context: {device.context_dir}",
        f"credentials:    {device.credentials}  (aiocoap-client --credentials)",
    ]
    return device


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def contexts(keys: Path) -> list[str]:
    """The key ids (hex) of the gateway-side contexts in a key store."""
    return sorted(p.name for p in keys.iterdir() if p.is_dir())


def key_store_files(keys: Path) -> dict[str, bytes | None]:
    """Every entry of a key store, with the content of its plain files (the key-id counter)."""
    return {p.name: None if p.is_dir() else p.read_bytes() for p in keys.iterdir()}


@asynccontextmanager
async def serve(
    store: str, keys: Path, port: int, log: Path, *extra: str, domain: str = "example.org"
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`serve --keys` on a loopback port; stopped with SIGTERM (if the test did not stop it)."""
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            "--keys", str(keys), "--domain", domain, *extra, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert ready.decode() == f"gateway ready on udp port {port}, domains {domain}\n", log.read_text()
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def anonymous_request(request: Message) -> Message:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        response: Message = await asyncio.wait_for(context.request(request).response, 10)
        return response
    finally:
        await context.shutdown()


async def refused_as_unknown_key(device: DeviceClient, path: str) -> Message:
    """The gateway answers a context it does not (or no longer) know with an unprotected
    4.01 (RFC 8613 8.2); aiocoap's client raises on a response without OSCORE."""
    with pytest.raises(NotAProtectedMessage) as refused:
        await device.request(Code.GET, path)
    plain: Message = refused.value.plain_message
    assert plain.code == Code.UNAUTHORIZED, plain
    return plain


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_serve_answers_a_get_and_exits_cleanly(store: str, tmp_path: Path, stop_signal: signal.Signals) -> None:
    assert gateway_cli("user", "add", "--store", store, ALICE).returncode == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys = tmp_path / "keys"
    alice_creds = provision(ALICE, store, keys, tmp_path / "devices", base)
    stderr_path = tmp_path / "serve.stderr"
    async with serve(store, keys, port, stderr_path) as proc:
        alice = await DeviceClient.create(base, ALICE, timeout=10, credentials=alice_creds.credentials)
        try:
            # OSCORE: the provisioned device is alice.
            presence = await alice.request(Code.GET, f"/p/{ALICE}")
            assert presence.code == Code.CONTENT
            assert codec.decode_presence_view(presence.payload).status is Status.CLOSED
            rules = await alice.request(Code.GET, f"/r/{ALICE}")  # only alice (or an admin) may read these
            assert rules.code == Code.CONTENT, rules.payload
            unknown = await alice.request(Code.GET, "/p/nobody@example.org")
            assert unknown.code == Code.NOT_FOUND and unknown.payload
        finally:
            await alice.close()
        # Unprotected: anonymous, and by default an anonymous request may only discover.
        anonymous = await anonymous_request(Message(code=Code.GET, uri=f"{base}/p/{ALICE}"))
        assert anonymous.code == Code.UNAUTHORIZED and anonymous.payload.startswith(b"authenticate (OSCORE)")
        discovery = await anonymous_request(Message(code=Code.GET, uri=f"{base}/.well-known/core"))
        assert discovery.code == Code.CONTENT and b"impp.presence" in discovery.payload
        proc.send_signal(stop_signal)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    log = stderr_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log
    # The clean stop persisted alice's replay window: the next start needs no Echo recovery.
    sequence = json.loads((keys / alice_creds.kid / "sequence.json").read_text())
    assert isinstance(sequence["received"], dict), sequence


async def test_provision_and_revoke(store: str, tmp_path: Path) -> None:
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys, devices = tmp_path / "keys", tmp_path / "devices"
    assert gateway_cli("user", "add", "--store", store, ALICE, BOB).returncode == 0

    phone = provision(ALICE, store, keys, devices, base)
    laptop = provision(BOB, store, keys, devices, base)
    tablet = provision(ALICE, store, keys, devices, base)  # a second device of alice: its own context
    assert [d.kid for d in (phone, laptop, tablet)] == ["00", "01", "02"]
    for device in (phone, laptop, tablet):
        # The device's side: a credentials file aiocoap-client accepts, pointing at its context.
        credentials = json.loads(device.credentials.read_text())
        assert credentials == {f"{base}/*": {"oscore": {"basedir": f"{device.context_dir}/"}}}
        client_secret = json.loads((device.context_dir / "secret.json").read_text())
        # The gateway's side: the same secret, the ids swapped, and the principal it authenticates.
        server_dir = keys / device.kid
        server_secret = json.loads((server_dir / "secret.json").read_text())
        assert json.loads((server_dir / "owner.json").read_text()) == {"user": device.user}
        assert client_secret["sender-id_hex"] == server_secret["recipient-id_hex"] == device.kid
        assert client_secret["recipient-id_hex"] == server_secret["sender-id_hex"] == ""
        assert client_secret["secret_hex"] == server_secret["secret_hex"]
        assert len(bytes.fromhex(server_secret["secret_hex"])) == 16
        # Secrets are private: files 0600, directories 0700.
        for path in (device.credentials, device.context_dir / "secret.json", server_dir / "secret.json",
                     server_dir / "owner.json"):
            assert mode(path) == 0o600, path
        for path in (device.context_dir, server_dir):
            assert mode(path) == 0o700, path
    assert json.loads((keys / phone.kid / "secret.json").read_text())["secret_hex"] != json.loads(
        (keys / tablet.kid / "secret.json").read_text()
    )["secret_hex"]

    # A malformed identity, or a user the store does not know, is never provisioned:
    # exit 2, a message, and no file written (nor a key id used up).
    before = key_store_files(keys), sorted(p.name for p in devices.iterdir())
    for bad, message in (
        ("not-an-id", "identifier must be user@domain"),
        ("eve@example.org\n", "bad domain"),
        ("carol@example.org", "carol@example.org is not a registered user (python -m gateway user add)"),
    ):
        result = gateway_cli(
            "provision", bad, "--store", store, "--keys", str(keys), "--out", str(devices), "--gateway", base
        )
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {message}\n"), bad
    for bad, message in (("not-an-id", "identifier must be user@domain"), ("eve@example.org\n", "bad domain")):
        bad_revoke = gateway_cli("revoke", bad, "--keys", str(keys))
        assert (bad_revoke.returncode, bad_revoke.stdout, bad_revoke.stderr) == (2, "", f"error: {message}\n"), bad
    assert (key_store_files(keys), sorted(p.name for p in devices.iterdir())) == before

    stderr_path = tmp_path / "serve.stderr"
    async with serve(store, keys, port, stderr_path) as proc:
        clients = {
            name: await DeviceClient.create(base, device.user, timeout=10, credentials=device.credentials)
            for name, device in (("phone", phone), ("laptop", laptop), ("tablet", tablet))
        }
        try:
            # Each device is its principal: alice's phone may read alice's rules, bob may not.
            assert (await clients["phone"].request(Code.GET, f"/r/{ALICE}")).code == Code.CONTENT
            assert (await clients["laptop"].request(Code.GET, f"/r/{ALICE}")).code == Code.FORBIDDEN
            assert (await clients["laptop"].request(Code.GET, f"/r/{BOB}")).code == Code.CONTENT

            # Revoking alice removes both her contexts (files of the gateway side) at once...
            revoked = gateway_cli("revoke", ALICE, "--keys", str(keys))
            assert (revoked.returncode, revoked.stdout, revoked.stderr) == (
                0, f"revoked 2 context(s) of {ALICE}: 00 02\n", ""
            )
            assert contexts(keys) == [laptop.kid]
            # ... and the running gateway refuses her devices' next requests, the one it had
            # already used (its context was cached) and the one it had never seen.
            for name in ("phone", "tablet"):
                plain = await refused_as_unknown_key(clients[name], f"/r/{ALICE}")
                assert plain.opt.oscore is None
            # Bob's device is not affected.
            assert (await clients["laptop"].request(Code.GET, f"/p/{ALICE}")).code == Code.CONTENT
            again = gateway_cli("revoke", ALICE, "--keys", str(keys))
            assert (again.returncode, again.stdout, again.stderr) == (0, f"revoked 0 context(s) of {ALICE}: -\n", "")
        finally:
            for client in clients.values():
                await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    log = stderr_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


async def test_aiocoap_client_accepts_the_credentials_file(store: str, tmp_path: Path) -> None:
    """The credentials file works in a stock client: `aiocoap-client --credentials FILE URI`."""
    assert gateway_cli("user", "add", "--store", store, ALICE).returncode == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys = tmp_path / "keys"
    alice = provision(ALICE, store, keys, tmp_path / "devices", base)
    client = [sys.executable, "-m", "aiocoap.cli.client"]
    async with serve(store, keys, port, tmp_path / "serve.stderr"):
        protected = subprocess.run(
            [*client, "--credentials", str(alice.credentials), f"{base}/r/{ALICE}"],
            capture_output=True, timeout=30, check=False,
        )
        assert protected.returncode == 0, protected.stderr.decode()
        assert codec.decode_rules(protected.stdout) == DEFAULT_RULES
        anonymous = subprocess.run([*client, f"{base}/r/{ALICE}"], capture_output=True, timeout=30, check=False)
        assert anonymous.returncode != 0 and b"4.01" in anonymous.stdout + anonymous.stderr


async def test_a_revoked_key_id_is_never_given_to_a_new_device(store: str, tmp_path: Path) -> None:
    """Were a revoked key id handed out again, a gateway still holding the revoked context
    could take the new device's requests for the old one's, and the old device's for its
    principal's (found while writing these tests: it did, in an earlier version)."""
    assert gateway_cli("user", "add", "--store", store, ALICE, CAROL).returncode == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys, devices = tmp_path / "keys", tmp_path / "devices"
    alice_creds = provision(ALICE, store, keys, devices, base)
    async with serve(store, keys, port, tmp_path / "serve.stderr") as proc:
        alice = await DeviceClient.create(base, ALICE, timeout=5, credentials=alice_creds.credentials)
        carol: DeviceClient | None = None
        try:
            assert (await alice.request(Code.GET, f"/r/{ALICE}")).code == Code.CONTENT  # now cached
            assert gateway_cli("revoke", ALICE, "--keys", str(keys)).returncode == 0
            carol_creds = provision(CAROL, store, keys, devices, base)
            assert carol_creds.kid != alice_creds.kid
            carol = await DeviceClient.create(base, CAROL, timeout=5, credentials=carol_creds.credentials)
            await refused_as_unknown_key(alice, f"/r/{ALICE}")
            assert (await carol.request(Code.GET, f"/r/{CAROL}")).code == Code.CONTENT
        finally:
            await alice.close()
            if carol is not None:
                await carol.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_serve_stops_cleanly_after_a_revocation(store: str, tmp_path: Path) -> None:
    """The gateway held the revoked context (its directory is gone) when told to stop
    (found while writing these tests: it exited 1 with a FileNotFoundError, in an earlier version)."""
    assert gateway_cli("user", "add", "--store", store, ALICE).returncode == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys = tmp_path / "keys"
    alice_creds = provision(ALICE, store, keys, tmp_path / "devices", base)
    log = tmp_path / "serve.stderr"
    async with serve(store, keys, port, log) as proc:
        alice = await DeviceClient.create(base, ALICE, timeout=5, credentials=alice_creds.credentials)
        try:
            assert (await alice.request(Code.GET, f"/p/{ALICE}")).code == Code.CONTENT
        finally:
            await alice.close()
        assert gateway_cli("revoke", ALICE, "--keys", str(keys)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert "Traceback" not in log.read_text(), log.read_text()


async def test_revocation_ends_the_revoked_devices_observations(store: str, tmp_path: Path) -> None:
    """A revoked device keeps no subscription: the gateway ends it with a last 4.01
    notification and sends it nothing more, whether the device stayed silent (bob's) or
    spoke again with the revoked context (carol's: refused) before the gateway noticed.
    Found while writing these tests: notifications went on, in earlier versions (and
    later still did for a device that had spoken first)."""
    assert gateway_cli("user", "add", "--store", store, ALICE, BOB, CAROL).returncode == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    keys, devices = tmp_path / "keys", tmp_path / "devices"
    creds = {user: provision(user, store, keys, devices, base) for user in (ALICE, BOB, CAROL)}
    async with serve(store, keys, port, tmp_path / "serve.stderr"):
        clients = {
            user: await DeviceClient.create(base, user, timeout=5, credentials=c.credentials)
            for user, c in creds.items()
        }
        received: dict[str, asyncio.Queue[Message | BaseException]] = {BOB: asyncio.Queue(), CAROL: asyncio.Queue()}

        async def watch(watcher: str) -> None:
            request = clients[watcher].context.request(Message(code=Code.GET, uri=f"{base}/p/{ALICE}", observe=0))
            try:
                await received[watcher].put(await request.response)
                async for notification in request.observation:
                    await received[watcher].put(notification)
            except Exception as exc:  # how aiocoap ends an observation with an error
                await received[watcher].put(exc)

        async def next_code(watcher: str, timeout: float) -> Code | None:
            item = await asyncio.wait_for(received[watcher].get(), timeout)
            return item.code if isinstance(item, Message) else getattr(item, "code", None)

        watchers = [asyncio.create_task(watch(user)) for user in (BOB, CAROL)]
        try:
            for user in (BOB, CAROL):
                assert await next_code(user, 5) == Code.CONTENT
            await clients[ALICE].publish(PresenceDocument(Status.OPEN, note="before"))
            for user in (BOB, CAROL):
                assert await next_code(user, 5) == Code.CONTENT

            for user in (BOB, CAROL):
                assert gateway_cli("revoke", user, "--keys", str(keys)).returncode == 0
            await refused_as_unknown_key(clients[CAROL], f"/p/{ALICE}")
            # The gateway notices within its sweep interval (1 s) and ends both observations.
            for user in (BOB, CAROL):
                assert await next_code(user, 2.5) == Code.UNAUTHORIZED, user
            await clients[ALICE].publish(PresenceDocument(Status.OPEN, note="after the revocation"))
            await asyncio.sleep(1)
            leaked = {user: received[user].qsize() for user in (BOB, CAROL)}
            assert leaked == {BOB: 0, CAROL: 0}, "a revoked device still got notifications"
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            for client in clients.values():
                await client.close()


async def test_device_sim_demo_runs_to_done(tmp_path: Path) -> None:
    port = free_udp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "device_sim", "demo", "--port", str(port), "--store", str(tmp_path / "demo.db"),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode()
    assert proc.returncode == 0, output + err.decode()
    said = [line.split("] ", 1)[-1] for line in output.splitlines()]
    # The demo provisions its devices itself, before the gateway starts.
    provisioned = said.index("gw     provisioned an OSCORE context for each of 3 devices")
    assert said.index(f"gw     gateway ready on udp port {port}, domains example.org") == provisioned + 1
    assert "demo   done" in said
    assert said[-1] == "gw     stopped (exit 0)"
    # The conversation happened: a non-ASCII IM arrived, and the away device collected its message.
    assert any(line.startswith("bob    got IM") and "Grüße aus Köln 👋" in line for line in said), output
    assert any(line.startswith("carol  back online, fetched") for line in said), output
    # Every IM names its sender: the principal its device's OSCORE context authenticated.
    got = [line for line in said if re.match(r"(alice|bob|carol) +(got IM|back online, fetched) #", line)]
    assert len(got) == 4, output
    for line in got:
        receiver = line.split()[0]
        expected = BOB if receiver == "alice" else ALICE
        assert f" from {expected}: " in line, line
    assert "Traceback" not in err.decode(), err.decode()
    # One private context per device, on each side; the clean stop persisted their replay windows.
    keys, devices = tmp_path / "demo.db.keys", tmp_path / "demo.db.devices"
    owners = {kid: json.loads((keys / kid / "owner.json").read_text())["user"] for kid in contexts(keys)}
    assert sorted(owners.values()) == [ALICE, BOB, CAROL]
    for kid, owner in owners.items():
        assert mode(keys / kid / "secret.json") == mode(devices / f"{owner}-{kid}.json") == 0o600
        assert isinstance(json.loads((keys / kid / "sequence.json").read_text())["received"], dict)


async def test_two_domains_federate_through_the_cli(tmp_path: Path) -> None:
    """`peer provision` on each side, `serve --peer --peer-credentials`: an IM from
    alice@a.example reaches bob@b.example through both gateways, over OSCORE."""
    ports = {"a": free_udp_port(), "b": free_udp_port()}
    base = {side: f"coap://127.0.0.1:{port}" for side, port in ports.items()}
    stores = {side: f"sqlite:{tmp_path / side}.db" for side in ports}
    keys = {side: tmp_path / f"keys-{side}" for side in ports}
    users = {"a": "alice@a.example", "b": "bob@b.example"}
    devices = {}
    for side, user in users.items():
        assert gateway_cli("user", "add", user, "--store", stores[side]).returncode == 0
        devices[side] = provision(user, stores[side], keys[side], tmp_path / "devices", base[side])
    peer_credentials = {}
    for side, other in (("a", "b"), ("b", "a")):  # each side provisions a context for the other's gateway
        made = gateway_cli("peer", "provision", f"{other}.example", "--keys", str(keys[side]),
                           "--out", str(tmp_path / f"peers-{side}"), "--gateway", base[side])
        assert made.returncode == 0, made.stderr
        peer_credentials[other] = re.search(r"give it: (\S+\.json)", made.stdout).group(1)  # type: ignore[union-attr]
    async with contextlib.AsyncExitStack() as stack:
        for side, other in (("a", "b"), ("b", "a")):
            await stack.enter_async_context(serve(
                stores[side], keys[side], ports[side], tmp_path / f"{side}.log",
                "--peer", f"{other}.example={base[other]}", "--peer-credentials", peer_credentials[side],
                domain=f"{side}.example",
            ))
        alice, bob = [
            await DeviceClient.create(base[s], UserId(users[s]), timeout=10, credentials=devices[s].credentials)
            for s in ("a", "b")
        ]
        try:
            seq = await alice.send(UserId(users["b"]), "across")
            [queued] = (await bob.fetch_inbox()).messages
            assert (queued.seq, queued.message.sender, queued.message.payload) == (seq, users["a"], b"across")
        finally:
            await alice.close()
            await bob.close()
