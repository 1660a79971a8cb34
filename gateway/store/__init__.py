"""Store backends, chosen by URL: ``sqlite:PATH`` (default) or ``memory:`` (SQLite in memory)."""

from __future__ import annotations

from .base import Store
from .sqlite import SqliteStore

SCHEMES = ("sqlite:", "memory:")


async def open_store(url: str) -> Store:
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:").removeprefix("//")
        return await SqliteStore.open(path or "gateway.db")
    if url == "memory:":
        return await SqliteStore.open(":memory:")
    raise ValueError(f"unknown store URL {url!r}; known schemes: {', '.join(SCHEMES)}")


__all__ = ["SqliteStore", "Store", "open_store"]
