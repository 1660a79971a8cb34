"""Simulated constrained devices and lossy links for the IMPP CoAP gateway."""
