"""Sans-IO core of the gateway: identifiers, domain model, codecs and state rules.

Nothing here imports asyncio, aiocoap, sqlite3 or redis, reads the clock or uses
global randomness; callers pass ``now`` in. ``tests/test_core_purity.py`` enforces it.
"""
