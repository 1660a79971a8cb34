"""IMPP (RFC 2779) presence and instant messaging gateway over CoAP for constrained devices."""

__version__ = "0.1.0"
