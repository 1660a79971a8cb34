"""A device's OSCORE context moves between gateway processes sharing one key directory.

aiocoap locks a context's directory to the process that loaded it: the gateway's
sender sequence numbers must never be used twice (AES-CCM nonce reuse). With
``--workers`` the kernel picks the process by source address and port, so a device
reaches another process when its NAT rebinds, or when a worker starts or stops and the
SO_REUSEPORT group is rehashed. That process cannot load the context.

It asks the holder over the event bus to let go. The holder ends the observations made
under the context with a last protected 5.03, so the device registers again. It
persists the exact sequence number and replay window, and releases the lock. The asker
then loads the context and answers. If the holder does not let go in time (it died
holding the lock: the kernel releases it; or no bus links the processes) the device
gets an unprotected 5.03 with Max-Age 1: "try again shortly", not a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiocoap import Code, Message, interfaces
from aiocoap.oscore import COSE_KID, CanUnprotect

from ..keys import KidIndexedCredentials
from .errors import short_diagnostic
from .site import PipeLayer

log = logging.getLogger(__name__)


def kid_of(request: Message) -> bytes | None:
    """The key id an OSCORE request names, or None (unprotected, or not parseable:
    the OSCORE layer answers those)."""
    if request.opt.oscore is None:
        return None
    try:
        _, _, unprotected, _ = CanUnprotect._extract_encrypted0(request)
    except Exception:
        return None
    kid = unprotected.get(COSE_KID)
    return kid if isinstance(kid, bytes) and kid else None


class ContextHandoff(PipeLayer):
    """Outer layer (before OSCORE): make sure this process holds the context a request
    names, asking the process that does to let go; and let go when asked."""

    WAIT_SECONDS = 2.0
    POLL_SECONDS = 0.02
    # Time for the last notifications of a released context to be protected and sent.
    LAST_WORDS_SECONDS = 0.2

    def __init__(
        self,
        inner: interfaces.Resource,
        credentials: KidIndexedCredentials,
        ask_release: Callable[[bytes], None],
        end_observations_in: Callable[[object, str], int],
    ) -> None:
        super().__init__(inner)
        self.credentials = credentials
        self.ask_release = ask_release
        self.end_observations_in = end_observations_in
        self._releasing: set[bytes] = set()
        self.taken_over = 0  # contexts this process loaded after another let go
        self.given_up = 0  # contexts this process let go when asked
        self.busy_answers = 0  # requests answered 5.03: the holder did not let go in time

    async def render_to_pipe(self, pipe: Any) -> None:
        kid = kid_of(pipe.request)
        if kid is not None and kid not in self._releasing and self.credentials.held_elsewhere(kid):
            if not await self._take_over(kid):
                self.busy_answers += 1
                pipe.add_response(
                    Message(
                        code=Code.SERVICE_UNAVAILABLE,
                        max_age=1,
                        payload=short_diagnostic("security context in use by another gateway process"),
                    ),
                    is_last=True,
                )
                return
        await self.inner.render_to_pipe(pipe)

    async def _take_over(self, kid: bytes) -> bool:
        self.ask_release(kid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.WAIT_SECONDS
        while loop.time() < deadline:
            await asyncio.sleep(self.POLL_SECONDS)
            if not self.credentials.held_elsewhere(kid):
                self.taken_over += 1
                log.info("took over the context of kid %s from another process", kid.hex())
                return True
        log.warning("the context of kid %s stayed locked by another process", kid.hex())
        return False

    def release(self, kid: bytes) -> None:
        """Another process asks for ``kid``'s context (a bus event)."""
        context = self.credentials.loaded(kid)
        if context is None or kid in self._releasing:
            return
        self._releasing.add(kid)
        ended = self.end_observations_in(context, "moved to another gateway process; observe again")
        delay = self.LAST_WORDS_SECONDS if ended else 0.0
        asyncio.get_running_loop().call_later(delay, self._let_go, kid)

    def _let_go(self, kid: bytes) -> None:
        self._releasing.discard(kid)
        if self.credentials.let_go(kid):
            self.given_up += 1
            log.info("let the context of kid %s go to another process", kid.hex())
