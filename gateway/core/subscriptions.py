"""Theory of operation: who watches whom (RFC 2779 5.1.9-5.1.11, 5.1.16).

Every established presence observation is a SUBSCRIPTION of one watcher (a principal,
or None for anonymous) to one presentity. The registry answers two questions:
the presentity's "who watches me, since when, and whom did I block politely" and the
watcher's "what am I subscribed to, and which subscriptions were ended by the other
side". To the watcher a politely blocked subscription looks active (5.1.15); only
the presentity sees the block. Ended subscriptions are remembered briefly (the last
few per watcher) so a device that was away can still learn why one ended.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from .ids import UserId

ENDED_KEPT_PER_WATCHER = 16


class SubscriptionState(IntEnum):
    ACTIVE = 0
    CANCELLED_BY_PRESENTITY = 1  # 5.1.16, told to the watcher (5.1.9)
    REFUSED = 2  # the presentity's rules no longer allow it
    CANCELLED_BY_ADMINISTRATOR = 3


@dataclass(frozen=True, slots=True)
class Subscription:
    watcher: UserId | None
    presentity: UserId
    since: int
    politely_blocked: bool = False


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    presentity: UserId
    state: SubscriptionState
    since: int  # when it started (active) or ended (otherwise)


class SubscriptionRegistry:
    def __init__(self) -> None:
        self._active: dict[int, Subscription] = {}
        self._ended: dict[UserId, deque[SubscriptionStatus]] = {}

    def add(self, key: int, subscription: Subscription) -> None:
        self._active[key] = subscription

    def get(self, key: int) -> Subscription | None:
        return self._active.get(key)

    def update_block(self, key: int, politely_blocked: bool) -> None:
        sub = self._active.get(key)
        if sub is not None and sub.politely_blocked != politely_blocked:
            self._active[key] = Subscription(sub.watcher, sub.presentity, sub.since, politely_blocked)

    def end(self, key: int, state: SubscriptionState | None, now: int) -> Subscription | None:
        """Forget an active subscription; unless it simply went away (state None),
        remember for its watcher how it ended."""
        sub = self._active.pop(key, None)
        if sub is not None and state is not None and sub.watcher is not None:
            ended = self._ended.setdefault(sub.watcher, deque(maxlen=ENDED_KEPT_PER_WATCHER))
            ended.append(SubscriptionStatus(sub.presentity, state, now))
        return sub

    def watchers_of(self, presentity: UserId) -> list[Subscription]:
        return sorted(
            (s for s in self._active.values() if s.presentity == presentity),
            key=lambda s: (s.since, s.watcher or ""),
        )

    def keys_of(self, presentity: UserId, watcher: UserId | None) -> list[int]:
        return [k for k, s in self._active.items() if s.presentity == presentity and s.watcher == watcher]

    def subscriptions_of(self, watcher: UserId) -> list[SubscriptionStatus]:
        """The watcher's view: a politely blocked subscription shows as ACTIVE."""
        active = [
            SubscriptionStatus(s.presentity, SubscriptionState.ACTIVE, s.since)
            for s in self._active.values()
            if s.watcher == watcher
        ]
        return sorted(active, key=lambda s: (s.since, s.presentity)) + list(self._ended.get(watcher, ()))
