"""``python -m benchmarks NAME [options]``: run one benchmark.

Benchmarks are listed by name with the module that implements them; a module is
imported only when its benchmark runs, and must offer ``main(argv) -> int``. To add
one, add a line to :data:`BENCHMARKS`.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "link": "benchmarks.link",
    "payload": "benchmarks.payload",
    "throughput": "benchmarks.throughput",
}


def _usage() -> str:
    names = "\n".join(f"  {name:<14} ({module})" for name, module in sorted(BENCHMARKS.items()))
    return f"usage: python -m benchmarks NAME [options]   (NAME --help for its options)\n\nbenchmarks:\n{names}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    module_path = BENCHMARKS.get(name)
    if module_path is None:
        print(f"error: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_path)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
