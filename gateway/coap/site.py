"""The root site: aiocoap's Site and .well-known/core, with a diagnostic on every 4.xx."""

from __future__ import annotations

from typing import Any

from aiocoap import Code, Message, error, resource

from .errors import short_diagnostic


class GatewaySite(resource.Site):  # type: ignore[misc]
    """aiocoap answers an unknown path with an empty 4.04; say what was wrong."""

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
