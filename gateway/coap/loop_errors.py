"""Containing exceptions aiocoap 0.4.17 lets escape into the event loop.

Some of its bugs end as an exception in a loop callback, which asyncio logs with a
full traceback each time (see aiocoap-notes). :class:`ContainedLoopErrors` is a loop
exception handler that takes the ones a predicate recognises (calling ``on_match``
instead of logging) and hands everything else to the handler that was there before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def raised_in(exc: BaseException, path_fragment: str) -> bool:
    """Whether any frame of ``exc``'s traceback is in a file whose path contains the fragment."""
    tb = exc.__traceback__
    while tb is not None:
        if path_fragment in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class ContainedLoopErrors:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        matches: Callable[[BaseException], bool],
        on_match: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.matches = matches
        self.on_match = on_match
        self.previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is not None and self.matches(exc):
            self.on_match()
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def remove(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)
