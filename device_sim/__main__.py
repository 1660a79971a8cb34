"""Command line: ``python -m device_sim demo``."""

from __future__ import annotations

import argparse
import sys

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sim")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo", help="start a gateway on udp/5683 and run two chatting devices")
    demo_cmd.add_argument("--port", type=int, default=5683)
    demo_cmd.add_argument("--store", default="var/demo.db")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.main(args.port, args.store)
    return 2


if __name__ == "__main__":
    sys.exit(main())
