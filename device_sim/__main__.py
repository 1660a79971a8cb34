"""Command line: ``python -m device_sim demo``, ``python -m device_sim run`` and ``python -m device_sim tun``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sim")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo", help="start a gateway on udp/5683 and run two chatting devices")
    demo_cmd.add_argument("--port", type=int, default=5683)
    demo_cmd.add_argument("--store", default="var/demo.db")
    run_cmd = sub.add_parser(
        "run",
        help="a fleet of simulated devices over emulated links (JSON result, PNG plot; last stdout line: JSON)",
    )
    from .fleet import add_run_arguments, run_cli

    add_run_arguments(run_cmd)
    run_cmd.add_argument("-v", "--verbose", action="store_true", help="log aiocoap and gateway warnings")
    tun_cmd = sub.add_parser("tun", help="packet-level link between two network namespaces (root; JSON lines)")
    from .tun import add_tun_arguments, tun_cli

    add_tun_arguments(tun_cmd)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.main(args.port, args.store)
    if args.command == "run":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            # Retransmissions, give-ups and unmatched responses are what this run is
            # about: counted in the result, not logged line by line.
            logging.getLogger("coap").setLevel(logging.ERROR)
            logging.getLogger("aiocoap").setLevel(logging.ERROR)
        return run_cli(args)
    if args.command == "tun":
        return tun_cli(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
