"""Measurements of the gateway: ``python -m benchmarks NAME [options]`` (see ``benchmarks.__main__``).

Each benchmark prints ratios measured side by side in one run, plots PNGs and ends its
standard output with one JSON line holding every figure.
"""
