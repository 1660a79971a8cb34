"""CoAP resource layer (aiocoap): turns requests into service calls and changes into notifications."""
