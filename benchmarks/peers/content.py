"""The one scenario every system runs, with the same content.

Alice is the presentity and the IM recipient; Bob watches her and sends her IMs.

Phases (in this order; a phase ends when every link has been quiet for a while):

``setup``      connect/authenticate, Alice online (OPEN, no note), Alice listens for
               IMs, Bob listens for delivery confirmations. Reported, not compared.
``subscribe``  Bob subscribes to Alice's presence and gets her current state.
``publish``    Alice publishes OPEN + a 20-character note. Alice's link is booked to
               the ``publish`` operation, Bob's (the notification) to ``notify``.
``im20``       Bob sends Alice a 20-character ASCII IM; it reaches Alice.
``ack``        Alice acknowledges delivery of that IM; the confirmation reaches Bob.
``im140``      Bob sends Alice a 140-character non-ASCII (Cyrillic) IM.
"""

from __future__ import annotations

ALICE = "alice@example.org"
BOB = "bob@example.org"
DOMAIN = "example.org"

NOTE = "In a meeting till 11"
IM20 = "See you at 10:30 ok?"
IM140 = (
    "Привет! Встречаемся завтра в 10:30 у главного входа. Не забудь ключи от лаборатории "  # noqa: RUF001
    "и зарядку: батарея датчика почти села, а до конца недели"  # noqa: RUF001
)
# Message ids, the same in every system: from a per-device counter that has reached 1000
# (device_sim.client.MessageIdCounter): 2 bytes. (A counter takes 1 byte for a device's
# first 255 messages and 3 up to 16.7 million; random ids take 8.)
IM20_ID = (1000).to_bytes(2, "big")
IM140_ID = (1001).to_bytes(2, "big")

OPERATIONS = ("subscribe", "publish", "notify", "im20", "ack", "im140")
PHASES = ("setup", "subscribe", "publish", "im20", "ack", "im140")

# operation -> (phase, legs booked to it; None = every leg)
BOOKING: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "setup": ("setup", None),
    "subscribe": ("subscribe", None),
    "publish": ("publish", ("alice",)),
    "notify": ("publish", ("bob",)),
    "im20": ("im20", None),
    "ack": ("ack", None),
    "im140": ("im140", None),
}

assert len(NOTE) == 20 and NOTE.isascii()
assert len(IM20) == 20 and IM20.isascii()
assert len(IM140) == 140 and not IM140.isascii()
