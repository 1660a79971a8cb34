"""Who does what in a simulated fleet: roles, per-device plans, and the default mix.

Theory of operation
===================

A fleet is a list of :class:`DeviceSpec`, one per device, decided before anything runs
(pure: no clock, no sockets, no global randomness). :mod:`device_sim.fleet` carries the
plans out. Devices refer to each other by their local name; the fleet adds a prefix and
the domain to make the ``user@domain`` identities.

Roles (each device also keeps its inbox observed and its presence alive unless its spec
says otherwise):

``CHAT``
    Half of a chat pair: sends IMs to its partner (Poisson, or at fixed times), every
    ``sleepy_every``-th one to a sleepy device instead when there is one; watches its
    partner's presence. Each IM has a unique id and is resent with the *same* id until
    the gateway answers 2.01, so the gateway deduplicates (exactly once).
``CHURN``
    Presence churn: publishes OPEN/CLOSED with a new note and a lease, again and again.
``SLEEPY``
    Wakes every ``wake_interval`` seconds: publishes (lease longer than its sleep),
    reads its queue with a cursor (``GET /i/me?c=N`` until not ``more``), acknowledges
    (``DELETE ?c=N``) and sleeps again. It observes nothing.
``VANISH``
    Behaves like a quiet phone until ``vanish_at``, then disappears without goodbye: no
    DELETE, no deregistration; its link turns into a black hole. Its watchers must see
    it out of contact within its lease.

The default mix for ``n`` devices (:func:`plan_fleet`): about 10 % sleepy, 10 %
vanishing (at least one of each from 4 devices on), a fifth of the rest churning and
the others in chat pairs. Every vanishing and churning device is watched by two chat
devices (round robin).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DeviceSpec", "Role", "plan_fleet"]


class Role(enum.Enum):
    CHAT = "chat"
    CHURN = "churn"
    SLEEPY = "sleepy"
    VANISH = "vanish"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device's plan. Times are seconds from the start of the run."""

    name: str
    """Local part of the identity (the fleet adds a prefix and ``@domain``)."""
    role: Role
    partner: str | None = None
    """CHAT: the device it chats with."""
    sleepy_targets: tuple[str, ...] = ()
    """CHAT: sleepy devices that get every ``sleepy_every``-th IM (round robin)."""
    watches: tuple[str, ...] = ()
    """Presentities this device subscribes to (Observe)."""
    publishes: bool = True
    """Publishes presence with a lease and keeps it alive (SLEEPY: at each wake)."""
    observes_inbox: bool = True
    """Keeps an Observe on its own inbox (SLEEPY never does)."""
    vanish_at: float | None = None
    """VANISH: when it disappears without goodbye."""
    outages: tuple[tuple[float, float], ...] = ()
    """Link outages (both directions), (start, end) seconds from the start of the run."""
    im_times: tuple[float, ...] | None = None
    """CHAT: send an IM at each of these times instead of Poisson traffic."""

    def __post_init__(self) -> None:
        if self.role is Role.VANISH and self.vanish_at is None:
            raise ValueError(f"{self.name}: a VANISH device needs vanish_at")
        if self.role is Role.SLEEPY and self.observes_inbox:
            object.__setattr__(self, "observes_inbox", False)
        for start, end in self.outages:
            if not 0.0 <= start < end:
                raise ValueError(f"{self.name}: outage needs 0 <= start < end, got {(start, end)}")

    @property
    def sends_ims(self) -> bool:
        return self.role is Role.CHAT and (self.partner is not None or bool(self.sleepy_targets))


def _counts(n: int) -> tuple[int, int, int, int]:
    """(chat, churn, sleepy, vanish) for ``n`` devices."""
    if n < 2:
        raise ValueError("a fleet needs at least 2 devices (one chat pair)")
    sleepy = 0 if n < 3 else max(1, n // 10)
    vanish = 0 if n < 4 else max(1, n // 10)
    rest = n - sleepy - vanish
    churn = rest // 5
    chat = rest - churn
    if chat % 2:
        chat -= 1
        churn += 1
    return chat, churn, sleepy, vanish


def plan_fleet(n: int, *, duration: float, outage: tuple[float, float] | None = None) -> list[DeviceSpec]:
    """The default mix for ``n`` devices over a run of ``duration`` seconds.

    Vanishing devices disappear between 30 % and 50 % of the run. ``outage`` (start,
    end), if given, is applied to the second device of every chat pair.

    >>> [spec.role.value for spec in plan_fleet(4, duration=30)]
    ['chat', 'chat', 'sleepy', 'vanish']
    >>> plan_fleet(4, duration=30)[3].vanish_at
    9.0
    """
    chat, churn, sleepy, _ = _counts(n)
    chat_names = [f"chat{i:03d}" for i in range(chat)]
    churn_names = [f"churn{i:03d}" for i in range(chat, chat + churn)]
    sleepy_names = [f"sleepy{i:03d}" for i in range(chat + churn, chat + churn + sleepy)]
    vanish_names = [f"vanish{i:03d}" for i in range(chat + churn + sleepy, n)]

    # Two chat watchers for every churning or vanishing presentity, round robin.
    extra_watches: dict[str, list[str]] = {name: [] for name in chat_names}
    watched = churn_names + vanish_names
    if chat_names:
        slot = 0
        for presentity in watched:
            for _ in range(min(2, len(chat_names))):
                extra_watches[chat_names[slot % len(chat_names)]].append(presentity)
                slot += 1

    specs: list[DeviceSpec] = []
    for i, name in enumerate(chat_names):
        partner = chat_names[i ^ 1]
        specs.append(
            DeviceSpec(
                name,
                Role.CHAT,
                partner=partner,
                sleepy_targets=_rotate(sleepy_names, i),
                watches=(partner, *extra_watches[name]),
                outages=(outage,) if outage is not None and i % 2 == 1 else (),
            )
        )
    specs += [DeviceSpec(name, Role.CHURN) for name in churn_names]
    specs += [DeviceSpec(name, Role.SLEEPY, observes_inbox=False) for name in sleepy_names]
    for j, name in enumerate(vanish_names):
        at = round(duration * (0.3 + 0.2 * j / max(1, len(vanish_names))), 3)
        specs.append(DeviceSpec(name, Role.VANISH, vanish_at=at))
    return specs


def _rotate(names: Sequence[str], by: int) -> tuple[str, ...]:
    if not names:
        return ()
    k = by % len(names)
    return (*names[k:], *names[:k])
