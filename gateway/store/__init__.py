"""Store backends, chosen by URL: ``sqlite:PATH`` (default), ``memory:`` (SQLite in memory),
``redis://host:port/db[?prefix=impp:]`` (shared by several gateway processes)."""

from __future__ import annotations

from .base import Store
from .sqlite import SqliteStore

SCHEMES = ("sqlite:", "memory:", "redis://", "rediss://")


async def open_store(url: str) -> Store:
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:").removeprefix("//")
        return await SqliteStore.open(path or "gateway.db")
    if url == "memory:":
        return await SqliteStore.open(":memory:")
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisStore  # only deployments using Redis need the client installed

        return await RedisStore.open(url)
    raise ValueError(f"unknown store URL {url!r}; known schemes: {', '.join(SCHEMES)}")


__all__ = ["SqliteStore", "Store", "open_store"]
