"""Command line: ``python -m gateway serve|user``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from .app import Gateway, parse_bind
from .core.errors import GatewayError
from .core.ids import domain_of, parse_user_id
from .core.model import UserRecord
from .store import open_store

DEFAULT_STORE = "sqlite:var/gateway.db"


async def _serve(args: argparse.Namespace) -> None:
    gateway = await Gateway.start(bind=parse_bind(args.bind), store=args.store, domains=args.domain)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gateway ready on udp port {gateway.port}, domains {', '.join(args.domain)}", flush=True)
    await stop.wait()
    await gateway.close()


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
                print(f"{'removed' if await store.remove_user(user) else 'no such user'} {user}")
        else:
            for record in await store.list_users():
                kinds = [k for k, on in (("presence", record.has_presentity), ("inbox", record.has_inbox)) if on]
                print(f"{record.user}\t{','.join(kinds)}")
    finally:
        await store.close()
    return 0


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

    user = sub.add_parser("user", help="register, remove or list users")
    actions = user.add_subparsers(dest="action", required=True)
    for name, text in (("add", "register users"), ("remove", "remove users"), ("list", "list users")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--store", default=DEFAULT_STORE)
        if name != "list":
            action.add_argument("ids", nargs="+", metavar="USER@DOMAIN")
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
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_serve(args))
            return 0
        return asyncio.run(_user(args))
    except GatewayError as exc:
        print(f"error: {exc.diagnostic}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
