"""The command line, run as an operator runs it: ``python -m gateway user|serve`` and
``python -m device_sim demo``, as real processes, over a real SQLite store and real UDP."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message

from gateway.core import codec
from gateway.core.model import Status

REPO = Path(__file__).resolve().parent.parent


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


def test_user_add_list_remove(store: str) -> None:
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

    removed = gateway_cli("user", "remove", "--store", store, "bob@example.org")
    assert (removed.returncode, removed.stdout) == (0, "removed bob@example.org\n")
    gone = gateway_cli("user", "remove", "--store", store, "bob@example.org")
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


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_serve_answers_a_get_and_exits_cleanly(store: str, tmp_path: Path, stop_signal: signal.Signals) -> None:
    assert gateway_cli("user", "add", "--store", store, "alice@example.org").returncode == 0
    port = free_udp_port()
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert ready.decode() == f"gateway ready on udp port {port}, domains example.org\n"
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            base = f"coap://127.0.0.1:{port}"
            presence = await asyncio.wait_for(
                context.request(Message(code=Code.GET, uri=f"{base}/p/alice@example.org")).response, 10
            )
            assert presence.code == Code.CONTENT
            assert codec.decode_presence_view(presence.payload).status is Status.CLOSED
            unknown = await asyncio.wait_for(
                context.request(Message(code=Code.GET, uri=f"{base}/p/nobody@example.org")).response, 10
            )
            assert unknown.code == Code.NOT_FOUND and unknown.payload
        finally:
            await context.shutdown()
        proc.send_signal(stop_signal)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = stderr_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


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
    assert f"gw     gateway ready on udp port {port}, domains example.org" in said
    assert "demo   done" in said
    assert said[-1] == "gw     stopped (exit 0)"
    # The conversation happened: a non-ASCII IM arrived, and the away device collected its message.
    assert any(line.startswith("bob    got IM") and "Grüße aus Köln 👋" in line for line in said), output
    assert any(line.startswith("carol  back online, fetched") for line in said), output
    assert "Traceback" not in err.decode(), err.decode()
