"""Command line: ``python -m gateway serve|user``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .app import Gateway, parse_bind
from .coap.exchange_lifetime import RFC7252_EXCHANGE_LIFETIME
from .core.errors import GatewayError
from .core.ids import UserId, domain_of, parse_user_id
from .core.model import UserRecord
from .federation import Federation, Resolver
from .keys import KeyStore
from .store import open_store

DEFAULT_STORE = "sqlite:var/gateway.db"
DEFAULT_KEYS = "var/keys"


def _port_taken(host: str, port: int) -> bool:
    """aiocoap binds with SO_REUSEPORT, so a second gateway on a busy port would start
    and silently split the traffic with the first. Probe without it first."""
    if port == 0:
        return False
    family = socket.AF_INET if host.count(".") == 3 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


async def _serve(args: argparse.Namespace) -> None:
    keys = None if args.no_oscore else Path(args.keys)
    gateway = await Gateway.start(
        bind=parse_bind(args.bind),
        store=args.store,
        domains=args.domain,
        keys=keys,
        admins=args.admin or (),
        bus=args.bus,
        transports=args.transports.split(","),
        exchange_lifetime=args.exchange_lifetime,
    )
    if args.peer or args.peer_dns:
        peers = dict(_peer_entry(text) for text in args.peer or ())
        credentials: list[Path | dict[str, object]] = [Path(p) for p in args.peer_credentials or ()]
        await gateway.enable_federation(Federation(Resolver(peers, use_dns=args.peer_dns), credentials))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gateway ready on udp port {gateway.port}, domains {', '.join(args.domain)}", flush=True)
    await stop.wait()
    await gateway.close()


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _peer_entry(text: str) -> tuple[str, str]:
    domain, sep, uri = text.partition("=")
    if not sep or not uri.startswith(("coap://", "coap+tcp://", "coap+ws://")):
        raise GatewayError(f"--peer wants DOMAIN=coap://HOST:PORT, not {text!r}")
    return domain, uri


async def _is_registered(store_url: str, user: UserId) -> bool:
    store = await open_store(store_url)
    try:
        return await store.get_user(user) is not None
    finally:
        await store.close()


async def _user(args: argparse.Namespace) -> int:
    store = await open_store(args.store)
    try:
        if args.action == "add":
            users = [parse_user_id(text) for text in args.ids]  # all valid, or nothing is stored
            for user in users:
                created = await store.add_user(
                    UserRecord(user, has_presentity=not args.no_presence, has_inbox=not args.no_inbox)
                )
                print(f"{'added' if created else 'updated'} {user} ({domain_of(user)})")
        elif args.action == "remove":
            for user in [parse_user_id(text) for text in args.ids]:
                removed = await store.remove_user(user)
                # A removed user's devices must not keep an identity the gateway accepts.
                revoked = KeyStore(Path(args.keys)).revoke(user)
                print(
                    f"{'removed' if removed else 'no such user'} {user}"
                    + (f", revoked {len(revoked)} key(s)" if revoked else "")
                )
        else:
            for record in await store.list_users():
                kinds = [k for k, on in (("presence", record.has_presentity), ("inbox", record.has_inbox)) if on]
                print(f"{record.user}\t{','.join(kinds)}")
    finally:
        await store.close()
    return 0


def _supervise_workers(argv: list[str], workers: int) -> int:
    """Run ``workers`` copies of this serve command (each bound to the same port with
    SO_REUSEPORT, which aiocoap sets) and stop them together."""
    child_argv = [a for a in argv if not a.startswith("--workers")]
    if "--workers" in argv:
        index = argv.index("--workers")
        child_argv = argv[:index] + argv[index + 2 :]
    children = [
        subprocess.Popen([sys.executable, "-m", "gateway", *child_argv, "--shared-port"]) for _ in range(workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="IMPP presence and IM gateway over CoAP")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--bind", default="[::]:5683", help="HOST:PORT to listen on (UDP), default [::]:5683")
    serve.add_argument("--store", default=DEFAULT_STORE, help=f"core store URL, default {DEFAULT_STORE}")
    serve.add_argument(
        "--domain", action="append", default=None, help="domain served (repeatable), default example.org"
    )
    serve.add_argument("--keys", default=DEFAULT_KEYS, help=f"OSCORE key store directory, default {DEFAULT_KEYS}")
    serve.add_argument("--no-oscore", action="store_true", help="serve unprotected only: every request is anonymous")
    serve.add_argument("--admin", action="append", metavar="USER@DOMAIN", help="an administrator (repeatable)")
    serve.add_argument(
        "--bus", default=None, help="change events shared with other gateway processes: redis://host:port/db"
    )
    serve.add_argument(
        "--transports",
        default="udp",
        help="comma-separated: udp (always), tcp (CoAP over TCP on the same port), ws (WebSockets on port+3000)",
    )
    serve.add_argument(
        "--peer", action="append", metavar="DOMAIN=URI",
        help="the gateway of another domain (federation; repeatable), e.g. b.example=coap://gw.b.example:5683",
    )
    serve.add_argument(
        "--peer-credentials", action="append", metavar="FILE",
        help="credentials a peer gateway provisioned for us (its `peer provision`; repeatable)",
    )
    serve.add_argument(
        "--peer-dns", action="store_true", help="find other domains' gateways by DNS SRV _coap._udp.DOMAIN too"
    )
    serve.add_argument(
        "--exchange-lifetime",
        type=_positive_seconds,
        default=RFC7252_EXCHANGE_LIFETIME,
        metavar="SECONDS",
        help="how long a request's message id and answer are kept to answer a retransmission "
        f"(duplicate cache, ~2 KB each; default {RFC7252_EXCHANGE_LIFETIME:g}, RFC 7252); at least the devices' "
        "MAX_TRANSMIT_SPAN plus twice the worst latency",
    )
    serve.add_argument("--shared-port", action="store_true", help=argparse.SUPPRESS)  # set for --workers children
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the UDP port (SO_REUSEPORT keeps a device with one); needs --bus",
    )

    provision = sub.add_parser("provision", help="create an OSCORE security context for a device of a user")
    provision.add_argument("user", metavar="USER@DOMAIN")
    provision.add_argument("--keys", default=DEFAULT_KEYS)
    provision.add_argument("--store", default=DEFAULT_STORE, help="where the user must be registered")
    provision.add_argument("--out", default="var/devices", help="where to write the device's side, default var/devices")
    provision.add_argument(
        "--gateway", default="coap://127.0.0.1:5683", help="the URI devices reach the gateway at (for credentials)"
    )
    peer = sub.add_parser(
        "peer", help="create an OSCORE context for the gateway of another domain (federation); give it the credentials"
    )
    peer.add_argument("action", choices=["provision"])
    peer.add_argument("domain", metavar="DOMAIN")
    peer.add_argument("--keys", default=DEFAULT_KEYS)
    peer.add_argument("--out", default="var/peers", help="where to write the peer's side, default var/peers")
    peer.add_argument(
        "--gateway", default="coap://127.0.0.1:5683", help="the URI the peer reaches this gateway at (as in its --peer)"
    )
    revoke = sub.add_parser("revoke", help="remove every security context of a user (takes effect at once)")
    revoke.add_argument("user", metavar="USER@DOMAIN")
    revoke.add_argument("--keys", default=DEFAULT_KEYS)

    user = sub.add_parser("user", help="register, remove or list users")
    actions = user.add_subparsers(dest="action", required=True)
    for name, text in (("add", "register users"), ("remove", "remove users"), ("list", "list users")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--store", default=DEFAULT_STORE)
        if name != "list":
            action.add_argument("ids", nargs="+", metavar="USER@DOMAIN")
        if name == "remove":
            action.add_argument("--keys", default=DEFAULT_KEYS, help="OSCORE key store: the user's keys are revoked")
        if name == "add":
            action.add_argument("--no-presence", action="store_true", help="an inbox without a presentity")
            action.add_argument("--no-inbox", action="store_true", help="a presentity without an inbox")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            args.domain = args.domain or ["example.org"]
            host, port = parse_bind(args.bind)
            if not args.shared_port and _port_taken(host, port):
                print(f"error: udp port {port} is in use on {host}", file=sys.stderr)
                return 2
            if args.workers > 1:
                if not args.bus:
                    print("error: --workers needs --bus redis://... to share change events", file=sys.stderr)
                    return 2
                return _supervise_workers(argv if argv is not None else sys.argv[1:], args.workers)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_serve(args))
            return 0
        if args.command == "provision":
            principal = parse_user_id(args.user)
            if not asyncio.run(_is_registered(args.store, principal)):
                print(f"error: {principal} is not a registered user (python -m gateway user add)", file=sys.stderr)
                return 2
            device = KeyStore(Path(args.keys)).provision(principal, Path(args.out), args.gateway)
            print(f"provisioned {device.user}: key id {device.kid.hex()}")
            print(f"device context: {device.context_dir}")
            print(f"credentials:    {device.credentials_file}  (aiocoap-client --credentials)")
            return 0
        if args.command == "peer":
            made = KeyStore(Path(args.keys)).provision_peer(args.domain, Path(args.out), args.gateway)
            print(f"provisioned the gateway of {args.domain}: key id {made.kid.hex()}")
            print(f"give it: {made.credentials_file} and {made.context_dir}/  (serve --peer-credentials)")
            return 0
        if args.command == "revoke":
            kids = KeyStore(Path(args.keys)).revoke(parse_user_id(args.user))
            print(f"revoked {len(kids)} context(s) of {args.user}: {' '.join(k.hex() for k in kids) or '-'}")
            return 0
        return asyncio.run(_user(args))
    except GatewayError as exc:
        print(f"error: {exc.diagnostic}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
