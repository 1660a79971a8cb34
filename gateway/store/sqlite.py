"""SQLite core store: the embedded default.

WAL mode with synchronous=FULL: a commit has reached the disk when it returns, so an
acknowledged message survives SIGKILL or power loss. All SQL runs on one dedicated
thread so the event loop never waits on fsync.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..core import codec
from ..core.access import AccessRules
from ..core.errors import Conflict
from ..core.ids import UserId
from ..core.model import (
    DeliveryRecord,
    DeliveryState,
    EnqueueResult,
    FailureReason,
    InstantMessage,
    MessageId,
    PresenceDocument,
    QueuedMessage,
    SendFacts,
    Seq,
    UserRecord,
)
from .base import FactsChanged

SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 5.0

_SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE users (
        user TEXT PRIMARY KEY,
        has_presentity INTEGER NOT NULL,
        has_inbox INTEGER NOT NULL)""",
    """CREATE TABLE presence (
        user TEXT PRIMARY KEY,
        doc BLOB NOT NULL,
        lease_deadline INTEGER)""",
    "CREATE INDEX presence_lease ON presence (lease_deadline) WHERE lease_deadline IS NOT NULL",
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        msg_id BLOB NOT NULL,
        body BLOB NOT NULL,
        received INTEGER NOT NULL,
        expires INTEGER,
        state INTEGER NOT NULL,
        reason INTEGER NOT NULL DEFAULT 0,
        updated INTEGER NOT NULL,
        UNIQUE (sender, msg_id))""",
    "CREATE INDEX messages_inbox ON messages (recipient, state, seq)",
    "CREATE INDEX messages_outbox ON messages (sender, updated)",
    "CREATE INDEX messages_expiry ON messages (expires) WHERE state = 0 AND expires IS NOT NULL",
]

# Schema version -> statements taking a store of the previous version to it.
_MIGRATIONS = {
    2: [
        "CREATE TABLE rules (user TEXT PRIMARY KEY, body BLOB NOT NULL)",
        "CREATE TABLE key_bundles (user TEXT PRIMARY KEY, body BLOB NOT NULL)",
    ],
    3: ["CREATE TABLE contacts (user TEXT PRIMARY KEY, body BLOB NOT NULL)"],
}

T = TypeVar("T")


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._waiting_enqueues: list[tuple[Callable[[], EnqueueResult], asyncio.Future[EnqueueResult]]] = []
        self._committing = False
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0  # group commits of enqueues

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        store = cls(path)
        await store._run(store._open)
        return store

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # The busy timeout first: several gateway processes may open a new file at once,
        # and switching it to WAL needs a moment of exclusive access.
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        for attempt in range(50):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                # Changing the journal mode does not wait on the busy handler everywhere.
                if attempt == 49:
                    raise
                time.sleep(0.02)
        db.execute("PRAGMA synchronous=FULL")
        self._db = db
        self._migrate()

    def _migrate(self) -> None:
        """Create or upgrade the schema, all in one write transaction: several gateway
        processes may open the same new file at once, and only one may create it."""
        db = self._conn
        with self._transaction():
            has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
            version = 0
            if has_meta:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"store schema {version} is newer than this gateway ({SCHEMA_VERSION})")
            if version == 0:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
                version = 1
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    db.execute(statement)
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(target),))

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is closed")
        return self._db

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- users ---------------------------------------------------------------------

    async def add_user(self, record: UserRecord) -> bool:
        def work() -> bool:
            with self._transaction():
                existed = self._conn.execute("SELECT 1 FROM users WHERE user=?", (record.user,)).fetchone()
                self._conn.execute(
                    "INSERT OR REPLACE INTO users VALUES (?, ?, ?)",
                    (record.user, int(record.has_presentity), int(record.has_inbox)),
                )
            return existed is None

        return await self._run(work)

    def _read_user(self, user: UserId) -> UserRecord | None:
        row = self._conn.execute("SELECT has_presentity, has_inbox FROM users WHERE user=?", (user,)).fetchone()
        return None if row is None else UserRecord(user, bool(row[0]), bool(row[1]))

    def _read_rules_body(self, user: UserId) -> bytes | None:
        row = self._conn.execute("SELECT body FROM rules WHERE user=?", (user,)).fetchone()
        return None if row is None else bytes(row[0])

    def _read_rules(self, user: UserId) -> AccessRules | None:
        body = self._read_rules_body(user)
        return None if body is None else codec.decode_rules(body)

    def _read_send_facts(self, sender: UserId, recipient: UserId | None) -> SendFacts:
        if recipient is None:
            return SendFacts(self._read_user(sender), None, None)
        to = self._read_user(recipient)
        stored = self._read_rules_body(recipient) if to is not None else None
        rules = None if stored is None else codec.decode_rules(stored)
        return SendFacts(self._read_user(sender), to, rules, stored)

    async def get_user(self, user: UserId) -> UserRecord | None:
        return await self._run(lambda: self._read_user(user))

    async def get_send_facts(self, sender: UserId, recipient: UserId | None) -> SendFacts:
        return await self._run(lambda: self._read_send_facts(sender, recipient))

    async def remove_user(self, user: UserId) -> bool:
        def work() -> bool:
            with self._transaction():
                cur = self._conn.execute("DELETE FROM users WHERE user=?", (user,))
                self._conn.execute("DELETE FROM presence WHERE user=?", (user,))
                self._conn.execute("DELETE FROM rules WHERE user=?", (user,))
                self._conn.execute("DELETE FROM key_bundles WHERE user=?", (user,))
                self._conn.execute("DELETE FROM contacts WHERE user=?", (user,))
                # Their senders learn why these will never arrive.
                self._conn.execute(
                    "UPDATE messages SET state=?, reason=?, updated=updated WHERE recipient=? AND state=?",
                    (int(DeliveryState.FAILED), int(FailureReason.UNKNOWN_RECIPIENT), user, int(DeliveryState.QUEUED)),
                )
            return cur.rowcount > 0

        return await self._run(work)

    async def list_users(self) -> list[UserRecord]:
        def work() -> list[UserRecord]:
            rows = self._conn.execute("SELECT user, has_presentity, has_inbox FROM users ORDER BY user").fetchall()
            return [UserRecord(UserId(r[0]), bool(r[1]), bool(r[2])) for r in rows]

        return await self._run(work)

    # -- presence ------------------------------------------------------------------

    async def get_presence(self, user: UserId) -> PresenceDocument | None:
        def work() -> PresenceDocument | None:
            row = self._conn.execute("SELECT doc FROM presence WHERE user=?", (user,)).fetchone()
            return None if row is None else codec.decode_presence_view(row[0])

        return await self._run(work)

    async def put_presence(self, user: UserId, doc: PresenceDocument, lease_deadline: int | None) -> None:
        body = codec.encode_presence(doc)

        def work() -> None:
            with self._transaction():
                self._conn.execute("INSERT OR REPLACE INTO presence VALUES (?, ?, ?)", (user, body, lease_deadline))

        await self._run(work)

    async def due_leases(self, now: int) -> list[UserId]:
        def work() -> list[UserId]:
            rows = self._conn.execute(
                "SELECT user FROM presence WHERE lease_deadline IS NOT NULL AND lease_deadline <= ?", (now,)
            ).fetchall()
            return [UserId(r[0]) for r in rows]

        return await self._run(work)

    # -- access rules --------------------------------------------------------------

    async def get_rules(self, user: UserId) -> AccessRules | None:
        return await self._run(lambda: self._read_rules(user))

    async def put_rules(self, user: UserId, rules: AccessRules) -> None:
        body = codec.encode_rules(rules)

        def work() -> None:
            with self._transaction():
                self._conn.execute("INSERT OR REPLACE INTO rules VALUES (?, ?)", (user, body))

        await self._run(work)

    # -- published public keys ------------------------------------------------------

    async def get_key_bundle(self, user: UserId) -> bytes | None:
        def work() -> bytes | None:
            row = self._conn.execute("SELECT body FROM key_bundles WHERE user=?", (user,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(work)

    async def put_key_bundle(self, user: UserId, bundle: bytes) -> None:
        def work() -> None:
            with self._transaction():
                self._conn.execute("INSERT OR REPLACE INTO key_bundles VALUES (?, ?)", (user, bundle))

        await self._run(work)

    # -- contacts ------------------------------------------------------------------

    async def get_contacts(self, user: UserId) -> tuple[UserId, ...]:
        def work() -> tuple[UserId, ...]:
            row = self._conn.execute("SELECT body FROM contacts WHERE user=?", (user,)).fetchone()
            return () if row is None else codec.decode_contacts(bytes(row[0]))

        return await self._run(work)

    async def put_contacts(self, user: UserId, contacts: tuple[UserId, ...]) -> None:
        body = codec.encode_contacts(contacts)

        def work() -> None:
            with self._transaction():
                self._conn.execute("INSERT OR REPLACE INTO contacts VALUES (?, ?)", (user, body))

        await self._run(work)

    # -- instant messages ----------------------------------------------------------

    async def enqueue(
        self, message: InstantMessage, body: bytes, received: int, expires: int | None, expect: SendFacts | None = None
    ) -> EnqueueResult:
        def work() -> EnqueueResult:
            row = self._conn.execute(
                "SELECT seq, body, recipient FROM messages WHERE sender=? AND msg_id=?",
                (message.sender, bytes(message.msg_id)),
            ).fetchone()
            if row is not None:
                if row[1] != body or row[2] != message.recipient:
                    raise Conflict("message id already used for another message")
                return EnqueueResult(Seq(row[0]), newly_stored=False)
            if expect is not None:
                now = self._read_send_facts(message.sender, message.recipient)
                if now != expect or now.rules_stored != expect.rules_stored:
                    raise FactsChanged()
            cur = self._conn.execute(
                "INSERT INTO messages (recipient, sender, msg_id, body, received, expires, state, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.recipient,
                    message.sender,
                    bytes(message.msg_id),
                    body,
                    received,
                    expires,
                    int(DeliveryState.QUEUED),
                    received,
                ),
            )
            assert cur.lastrowid is not None
            return EnqueueResult(Seq(cur.lastrowid), newly_stored=True)

        return await self._group_commit(work)

    async def _group_commit(self, work: Callable[[], EnqueueResult]) -> EnqueueResult:
        """Run ``work`` in a transaction shared with the enqueues waiting beside it: one
        commit (one fsync) for all of them, each in a savepoint of its own so that one
        refused leaves the others stored. Each is answered only after that commit."""
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self._waiting_enqueues.append((work, future))
        if not self._committing:
            self._committing = True
            self._committer = asyncio.get_running_loop().create_task(self._commit_waiting())
        return await future

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting_enqueues:
                batch, self._waiting_enqueues = self._waiting_enqueues, []
                try:
                    works = [work for work, _ in batch]
                    outcomes = await self._run(functools.partial(self._commit_batch, works))
                except Exception as exc:  # the commit itself failed: none of them is stored
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its requester gave up waiting
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._committing = False

    def _commit_batch(self, works: list[Callable[[], EnqueueResult]]) -> list[EnqueueResult | Exception]:
        outcomes: list[EnqueueResult | Exception] = []
        with self._transaction():
            for work in works:
                self._conn.execute("SAVEPOINT enqueue")
                try:
                    outcomes.append(work())
                except Exception as exc:
                    self._conn.execute("ROLLBACK TO enqueue")
                    outcomes.append(exc)
                self._conn.execute("RELEASE enqueue")
        self.commits += 1
        return outcomes

    async def pending(self, recipient: UserId, after: Seq, limit: int) -> list[QueuedMessage]:
        def work() -> list[QueuedMessage]:
            rows = self._conn.execute(
                "SELECT seq, body, received FROM messages WHERE recipient=? AND state=? AND seq>? ORDER BY seq LIMIT ?",
                (recipient, int(DeliveryState.QUEUED), after, limit),
            ).fetchall()
            return [QueuedMessage(Seq(r[0]), codec.decode_message(r[1], recipient), r[2]) for r in rows]

        return await self._run(work)

    async def acknowledge(self, recipient: UserId, upto: Seq, now: int) -> list[UserId]:
        def work() -> list[UserId]:
            with self._transaction():
                senders = self._conn.execute(
                    "SELECT DISTINCT sender FROM messages WHERE recipient=? AND state=? AND seq<=?",
                    (recipient, int(DeliveryState.QUEUED), upto),
                ).fetchall()
                self._conn.execute(
                    "UPDATE messages SET state=?, updated=? WHERE recipient=? AND state=? AND seq<=?",
                    (int(DeliveryState.DELIVERED), now, recipient, int(DeliveryState.QUEUED), upto),
                )
            return [UserId(r[0]) for r in senders]

        return await self._run(work)

    async def records(self, sender: UserId, limit: int) -> list[DeliveryRecord]:
        def work() -> list[DeliveryRecord]:
            rows = self._conn.execute(
                "SELECT msg_id, recipient, state, reason, updated FROM messages WHERE sender=?"
                " ORDER BY seq DESC LIMIT ?",
                (sender, limit),
            ).fetchall()
            return [
                DeliveryRecord(MessageId(r[0]), UserId(r[1]), DeliveryState(r[2]), FailureReason(r[3]), r[4])
                for r in rows
            ]

        return await self._run(work)

    async def expire_messages(self, now: int) -> list[tuple[UserId, UserId]]:
        def work() -> list[tuple[UserId, UserId]]:
            with self._transaction():
                rows = self._conn.execute(
                    "SELECT DISTINCT sender, recipient FROM messages WHERE state=? AND expires IS NOT NULL"
                    " AND expires<=?",
                    (int(DeliveryState.QUEUED), now),
                ).fetchall()
                self._conn.execute(
                    "UPDATE messages SET state=?, reason=?, updated=? WHERE state=? AND expires IS NOT NULL"
                    " AND expires<=?",
                    (int(DeliveryState.FAILED), int(FailureReason.EXPIRED), now, int(DeliveryState.QUEUED), now),
                )
            return [(UserId(r[0]), UserId(r[1])) for r in rows]

        return await self._run(work)

    async def close(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(work)
        self._executor.shutdown(wait=True)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; with synchronous=FULL the COMMIT is durable."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
