"""The root site: aiocoap's Site and .well-known/core, with a diagnostic on every 4.xx."""

from __future__ import annotations

import asyncio
from typing import Any

from aiocoap import Code, Message, error, interfaces, resource

from .errors import short_diagnostic


class PathStrippedRequest(Message):  # type: ignore[misc]
    """A request as a resource below the site sees it: its path without the resource's
    own segments. Its request URI is still the original one, worked out only if asked
    (aiocoap works it out for every request, 8% of an IM's CPU, and nothing here asks)."""

    original: Message | None = None

    def get_request_uri(self, *args: Any, **kwargs: Any) -> str:
        if self.original is None:  # a copy of one (Message.copy keeps the class)
            return str(super().get_request_uri(*args, **kwargs))
        return str(self.original.get_request_uri(*args, **kwargs))


def with_path(request: Message, uri_path: tuple[str, ...]) -> Message:
    """``request.copy(uri_path=...)`` without deep-copying every option, which took a
    tenth of an IM's CPU: options are values nobody changes in place, so the copy gets
    the same ones, in lists of its own, and only the path changes."""
    stripped = PathStrippedRequest(
        code=request.code, payload=request.payload, transport_tuning=request.transport_tuning
    )
    stripped.mtype, stripped.mid, stripped.token = request.mtype, request.mid, request.token
    stripped.remote, stripped.direction = request.remote, request.direction
    stripped.opt._options = {number: list(values) for number, values in request.opt._options.items()}
    stripped.opt.uri_path = uri_path
    stripped.original = request
    return stripped


class GatewaySite(resource.Site):  # type: ignore[misc]
    """aiocoap answers an unknown path with an empty 4.04; say what was wrong. And a
    collection's own path (``/p``: the requester's presence) goes to the collection:
    aiocoap 0.4.17 hands a path-capable resource only longer paths. Every resource is
    one segment deep (``/p``, ``/i``, …) or ``/.well-known/core``."""

    def _find_child_and_pathstripped_message(self, request: Any) -> Any:
        path = tuple(request.opt.uri_path)
        if path in self._resources:
            return self._resources[path], with_path(request, ())
        collection = self._subsites.get(path[:1]) if path else None
        if collection is not None:
            rest = path[1:]
            # A trailing slash (``/p/``) names the collection itself, as in aiocoap.
            return collection, with_path(request, () if rest == ("",) else rest)
        return super()._find_child_and_pathstripped_message(request)

    async def render_to_pipe(self, request: Any) -> None:
        try:
            await super().render_to_pipe(request)
        except error.NotFound as exc:
            if exc.args:
                raise
            raise error.NotFound("no such resource; see /.well-known/core") from None


class WellKnownCore(resource.WKCResource):  # type: ignore[misc]
    async def render_get(self, request: Message) -> Message:
        response: Message = await super().render_get(request)
        if response.code is not None and not response.code.is_successful() and not response.payload:
            text = "only link-format (40) is served" if response.code == Code.NOT_ACCEPTABLE else "bad request"
            response.payload = short_diagnostic(text)
        return response


class PipeLayer(interfaces.Resource):  # type: ignore[misc]
    """A layer around the site that sees every request as aiocoap hands it over
    (``render_to_pipe``), before passing it to ``inner``."""

    def __init__(self, inner: interfaces.Resource) -> None:
        self.inner = inner

    async def render_to_pipe(self, pipe: Any) -> None:
        await self.inner.render_to_pipe(pipe)

    async def render(self, request: Message) -> Message:
        raise RuntimeError("only render_to_pipe is used")

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        raise RuntimeError("only render_to_pipe is used")

    def get_resources_as_linkheader(self) -> Any:
        return self.inner.get_resources_as_linkheader()


class DeregistrationWatch(PipeLayer):
    """Outermost layer: notes which peers sent an RFC 7641 deregistration (GET with
    Observe=1), before OSCORE hides it: inside OSCORE, aiocoap 0.4.17 shows the request
    without its Observe option or token. An observation that ends just as its peer
    deregistered was ended on purpose, not by a lost link."""

    KEEP_SECONDS = 10.0

    def __init__(self, inner: interfaces.Resource) -> None:
        super().__init__(inner)
        self.seen: dict[str, float] = {}

    def deregistered_since(self, hostinfo: str, since: float) -> bool:
        return self.seen.get(hostinfo, float("-inf")) >= since

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.opt.observe == 1:
            now = asyncio.get_running_loop().time()
            if len(self.seen) > 1000:
                self.seen = {k: t for k, t in self.seen.items() if now - t < self.KEEP_SECONDS}
            self.seen[request.remote.hostinfo] = now
        await self.inner.render_to_pipe(pipe)
