"""Redis core store: shared state for several gateway processes, on one or many machines.

URL: ``redis://[user:password@]host:port/db[?prefix=impp:]`` (``rediss://`` for TLS). Every
key lives under the prefix (default ``impp:``), so several gateways, or test runs, can
share one Redis database without meeting. Values are bytes; ids are UTF-8.

Key layout (``P`` = the prefix)::

    P meta               hash    schema -> layout version (refused if newer than this code)
    P users              zset    user ids, all scored 0 so they list in byte order
    P user:{id}          hash    presentity 0|1, inbox 0|1
    P presence:{id}      string  encoded presence document (codec.encode_presence)
    P leases             zset    user id scored by its lease deadline (absent: no lease)
    P rules:{id}         string  encoded access rules (codec.encode_rules)
    P keys:{id}          string  the published key bundle
    P contacts:{id}      string  encoded contacts (codec.encode_contacts)
    P seq                string  store-wide message counter (INCR): the next seq
    P msg:{seq}          hash    sender, recipient, msg_id, body, received, expires (absent:
                                 never), state (DeliveryState), reason (FailureReason), updated
    P dedup:{sender}     hash    msg_id -> seq: one message per (sender, msg_id), forever
    P inbox:{recipient}  zset    seqs still QUEUED for the recipient, scored by seq
    P out:{sender}       zset    every seq the sender sent, scored by seq (delivery records)
    P expiry             zset    seqs still QUEUED that carry a ttl, scored by expiry time

Messages are never deleted, as in the SQLite store: ``msg``, ``dedup`` and ``out`` grow with
the traffic. ``inbox`` and ``expiry`` hold only QUEUED messages; a message leaves both in the
same step that moves it out of QUEUED.

Atomicity: every change touching more than one key runs as one Lua script (``enqueue``,
``acknowledge``, ``expire_messages``, ``remove_user``) or one MULTI/EXEC (``add_user``,
``put_presence``); Redis runs each to completion before any other command, so two gateway
processes racing see one order. A message leaves QUEUED only in a script that first reads
its state as QUEUED, so an acknowledge and an expiry (or two of either) can never both win
it, and a (sender, msg_id) can be stored only once. The scripts check everything before
their first write, so a refused enqueue leaves nothing behind. Multi-key reads (``pending``,
``records``, ``list_users``) are scripts too, so they see one consistent snapshot.
``acknowledge`` and ``expire_messages`` work in batches (``batch`` messages per script) so one
call never blocks Redis for long; each batch is atomic, and both are safe to repeat, as is
every operation here, so the client may retry one after a lost connection.

The scripts build the ``msg:``/``inbox:`` keys of the messages they touch, which Redis allows
on one server (with replicas or Sentinel). On Redis Cluster, every key must hash to one
slot: a hash-tagged prefix such as ``{impp}:`` does that (untested here).

Durability: an acknowledged write is durable only as far as the Redis deployment persists
it. The Store protocol promises stable storage when a coroutine returns; with Redis that
holds only with ``appendonly yes`` and ``appendfsync always`` (``everysec`` may lose the last
second on a crash, RDB snapshots far more). The Redis on the development and CI machines
keeps nothing on disk (``--save "" --appendonly no``): there a restart loses everything.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis

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

LAYOUT_VERSION = 1
DEFAULT_PREFIX = "impp:"
MAX_CONNECTIONS = 64  # per gateway process
# Bound on every store call, waiting for a connection slot included (redis-py's default
# socket timeout, applied once per call: redis-py's own, per command, costs an asyncio
# task per write on Python 3.11, about 8% of an IM's CPU). A call cut short disconnects
# its connection (redis-py does on cancel).
CALL_TIMEOUT_S = 5.0
DEFAULT_BATCH = 500


def _lua(text: str) -> str:
    """Fill the state and reason numbers into a script, so Lua and Python share them."""
    for name, value in {
        "QUEUED": DeliveryState.QUEUED,
        "DELIVERED": DeliveryState.DELIVERED,
        "FAILED": DeliveryState.FAILED,
        "UNKNOWN_RECIPIENT": FailureReason.UNKNOWN_RECIPIENT,
        "EXPIRED": FailureReason.EXPIRED,
    }.items():
        text = text.replace(f"@{name}@", f"'{int(value)}'")
    return text


# KEYS: meta; ARGV: this code's layout version. Returns the layout version of the store.
_CLAIM_LAYOUT = """
redis.call('HSETNX', KEYS[1], 'schema', ARGV[1])
return redis.call('HGET', KEYS[1], 'schema')
"""

# KEYS: dedup:{sender}, seq, inbox:{recipient}, out:{sender}, expiry
#       [, user:{sender}, user:{recipient}, rules:{recipient}: the facts to check]
# ARGV: prefix, msg_id, sender, recipient, body, received, expires ('' = never)
#       [, the sender's and the recipient's flags (presentity, inbox: '11', '' = none),
#        '1' and the recipient's stored rules, or '0' and '' for none]
# Returns {seq, 1} stored, {seq, 0} a resend of the same message, {seq, -1} a conflict,
# {0, 2} nothing stored: the facts differ.
_ENQUEUE = _lua("""
local prefix = ARGV[1]
local known = redis.call('HGET', KEYS[1], ARGV[2])
if known then
    local held = redis.call('HMGET', prefix .. 'msg:' .. known, 'body', 'recipient')
    if held[1] ~= ARGV[5] or held[2] ~= ARGV[4] then
        return {tonumber(known), -1}
    end
    return {tonumber(known), 0}
end
if KEYS[6] then
    local function flags(key)
        local m = redis.call('HMGET', key, 'presentity', 'inbox')
        if not m[1] then return '' end
        return m[1] .. (m[2] or '0')
    end
    local rules = redis.call('GET', KEYS[8])
    if flags(KEYS[6]) ~= ARGV[8] or flags(KEYS[7]) ~= ARGV[9]
            or (rules and '1' or '0') ~= ARGV[10] or (rules or '') ~= ARGV[11] then
        return {0, 2}
    end
end
local seq = string.format('%d', redis.call('INCR', KEYS[2]))
local fields = {'sender', ARGV[3], 'recipient', ARGV[4], 'msg_id', ARGV[2], 'body', ARGV[5],
                'received', ARGV[6], 'state', @QUEUED@, 'reason', '0', 'updated', ARGV[6]}
if ARGV[7] ~= '' then
    table.insert(fields, 'expires')
    table.insert(fields, ARGV[7])
end
redis.call('HSET', prefix .. 'msg:' .. seq, unpack(fields))
redis.call('HSET', KEYS[1], ARGV[2], seq)
redis.call('ZADD', KEYS[3], seq, seq)
redis.call('ZADD', KEYS[4], seq, seq)
if ARGV[7] ~= '' then
    redis.call('ZADD', KEYS[5], ARGV[7], seq)
end
return {tonumber(seq), 1}
""")

# KEYS: inbox:{recipient}; ARGV: prefix, after, limit. Returns seq, body, received, ...
_PENDING = """
local seqs = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, seq in ipairs(seqs) do
    local m = redis.call('HMGET', ARGV[1] .. 'msg:' .. seq, 'body', 'received')
    if m[1] then
        table.insert(out, seq)
        table.insert(out, m[1])
        table.insert(out, m[2])
    end
end
return out
"""

# KEYS: inbox:{recipient}, expiry; ARGV: prefix, upto, now, batch.
# Returns {number of seqs taken off the inbox, {senders newly told, in seq order}}.
_ACKNOWLEDGE = _lua("""
local seqs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local senders, seen = {}, {}
for _, seq in ipairs(seqs) do
    local key = ARGV[1] .. 'msg:' .. seq
    local m = redis.call('HMGET', key, 'state', 'sender')
    if m[1] == @QUEUED@ then
        redis.call('HSET', key, 'state', @DELIVERED@, 'updated', ARGV[3])
        if not seen[m[2]] then
            seen[m[2]] = true
            table.insert(senders, m[2])
        end
    end
end
if #seqs > 0 then
    redis.call('ZREM', KEYS[1], unpack(seqs))
    redis.call('ZREM', KEYS[2], unpack(seqs))
end
return {#seqs, senders}
""")

# KEYS: expiry; ARGV: prefix, now, batch.
# Returns {number of seqs taken off the expiry set, sender, recipient, sender, recipient, ...}.
_EXPIRE = _lua("""
local prefix = ARGV[1]
local seqs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out, seen = {#seqs}, {}
for _, seq in ipairs(seqs) do
    local key = prefix .. 'msg:' .. seq
    local m = redis.call('HMGET', key, 'state', 'sender', 'recipient')
    if m[1] == @QUEUED@ then
        redis.call('HSET', key, 'state', @FAILED@, 'reason', @EXPIRED@, 'updated', ARGV[2])
        redis.call('ZREM', prefix .. 'inbox:' .. m[3], seq)
        seen[m[2]] = seen[m[2]] or {}
        if not seen[m[2]][m[3]] then
            seen[m[2]][m[3]] = true
            table.insert(out, m[2])
            table.insert(out, m[3])
        end
    end
end
if #seqs > 0 then
    redis.call('ZREM', KEYS[1], unpack(seqs))
end
return out
""")

# KEYS: out:{sender}; ARGV: prefix, last index (-1 = all). Returns 5 fields per record.
_RECORDS = """
local seqs = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[2]))
local out = {}
for _, seq in ipairs(seqs) do
    local m = redis.call('HMGET', ARGV[1] .. 'msg:' .. seq, 'msg_id', 'recipient', 'state', 'reason', 'updated')
    if m[1] then
        for i = 1, 5 do
            table.insert(out, m[i])
        end
    end
end
return out
"""

# KEYS: users, user:{id}, presence:{id}, rules:{id}, keys:{id}, leases, inbox:{id}, expiry,
# contacts:{id}. ARGV: prefix, user. Returns 1 if the user was registered.
_REMOVE_USER = _lua("""
local existed = redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[9])
redis.call('ZREM', KEYS[6], ARGV[2])
local seqs = redis.call('ZRANGE', KEYS[7], 0, -1)
for _, seq in ipairs(seqs) do
    local key = ARGV[1] .. 'msg:' .. seq
    if redis.call('HGET', key, 'state') == @QUEUED@ then
        redis.call('HSET', key, 'state', @FAILED@, 'reason', @UNKNOWN_RECIPIENT@)
    end
    redis.call('ZREM', KEYS[8], seq)
end
redis.call('DEL', KEYS[7])
return existed
""")

# KEYS: users; ARGV: prefix. Returns user, presentity, inbox, ...
# KEYS: the sender's user hash[, the recipient's user hash, its rules]. One command
# instead of a pipeline: redis-py's pipelines cost more client CPU than the reads.
_SEND_FACTS = """
local out = {redis.call('HMGET', KEYS[1], 'presentity', 'inbox')}
if KEYS[2] then
    table.insert(out, redis.call('HMGET', KEYS[2], 'presentity', 'inbox'))
    table.insert(out, redis.call('GET', KEYS[3]))
end
return out
"""

_LIST_USERS = """
local out = {}
for _, user in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local m = redis.call('HMGET', ARGV[1] .. 'user:' .. user, 'presentity', 'inbox')
    table.insert(out, user)
    table.insert(out, m[1] or '0')
    table.insert(out, m[2] or '0')
end
return out
"""


def parse_url(url: str) -> tuple[str, str]:
    """Split our ``prefix`` option off a Redis URL: (URL for redis-py, key prefix).

    >>> parse_url("redis://127.0.0.1:6379/2?prefix=gw1:")
    ('redis://127.0.0.1:6379/2', 'gw1:')
    >>> parse_url("redis://localhost")
    ('redis://localhost', 'impp:')
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    if len(prefixes) > 1 or (prefixes and not prefixes[0]):
        raise ValueError("a Redis store URL takes at most one non-empty prefix")
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[0] if prefixes else DEFAULT_PREFIX


def _user(value: bytes) -> UserId:
    return UserId(value.decode("utf-8"))


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX, batch: int = DEFAULT_BATCH) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._redis = client
        self.prefix = prefix
        self.batch = batch
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._enqueue = client.register_script(_ENQUEUE)
        self._pending = client.register_script(_PENDING)
        self._acknowledge = client.register_script(_ACKNOWLEDGE)
        self._expire = client.register_script(_EXPIRE)
        self._records = client.register_script(_RECORDS)
        self._remove_user = client.register_script(_REMOVE_USER)
        self._list_users = client.register_script(_LIST_USERS)
        self._send_facts = client.register_script(_SEND_FACTS)

    @classmethod
    async def open(cls, url: str, *, batch: int = DEFAULT_BATCH) -> RedisStore:
        """Connect, check the server answers and that its layout is one this code knows."""
        client_url, prefix = parse_url(url)
        # redis-py 8 caps the pool and raises MaxConnectionsError past the cap: store calls
        # take a slot first (see _bounded), so a burst waits instead of failing. (Its
        # BlockingConnectionPool waits too, but costs 40% more CPU per command.)
        pool = aioredis.ConnectionPool.from_url(
            client_url, max_connections=MAX_CONNECTIONS, decode_responses=False, socket_timeout=None
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
        store = cls(client, prefix, batch)
        try:
            version = int(await client.register_script(_CLAIM_LAYOUT)(keys=[store._key("meta")], args=[LAYOUT_VERSION]))
            if version > LAYOUT_VERSION:
                raise RuntimeError(f"store layout {version} is newer than this gateway ({LAYOUT_VERSION})")
        except BaseException:
            await client.aclose()
            raise
        return store

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # redis-py's annotations of command replies differ between its releases ("Awaitable[T] | T"
    # for the sync and async clients at once, or str | bytes whatever decode_responses says):
    # replies are cast once here, to what a client with decode_responses=False returns.

    async def _get(self, key: str) -> bytes | None:
        return await cast("Awaitable[bytes | None]", self._redis.get(key))

    # -- users ---------------------------------------------------------------------

    async def add_user(self, record: UserRecord) -> bool:
        async with self._redis.pipeline(transaction=True) as tx:
            tx.zadd(self._key("users"), {record.user: 0})
            tx.hset(
                self._key("user", record.user),
                mapping={"presentity": int(record.has_presentity), "inbox": int(record.has_inbox)},
            )
            added, _ = await tx.execute()
        return bool(added)

    async def get_user(self, user: UserId) -> UserRecord | None:
        reply = self._redis.hmget(self._key("user", user), ["presentity", "inbox"])
        presentity, inbox = await cast("Awaitable[list[bytes | None]]", reply)
        if presentity is None:
            return None
        return UserRecord(user, presentity == b"1", inbox == b"1")

    async def get_send_facts(self, sender: UserId, recipient: UserId | None) -> SendFacts:
        keys = [self._key("user", sender)]
        if recipient is not None:
            keys += [self._key("user", recipient), self._key("rules", recipient)]
        replies = await self._send_facts(keys=keys)

        def record(user: UserId, fields: list[bytes | None]) -> UserRecord | None:
            presentity, inbox = fields
            return None if presentity is None else UserRecord(user, presentity == b"1", inbox == b"1")

        if recipient is None:
            return SendFacts(record(sender, replies[0]), None, None)
        to, stored = record(recipient, replies[1]), replies[2]
        rules = codec.decode_rules(stored) if to is not None and stored is not None else None
        return SendFacts(record(sender, replies[0]), to, rules, stored)

    async def remove_user(self, user: UserId) -> bool:
        keys = [
            self._key("users"),
            self._key("user", user),
            self._key("presence", user),
            self._key("rules", user),
            self._key("keys", user),
            self._key("leases"),
            self._key("inbox", user),
            self._key("expiry"),
            self._key("contacts", user),
        ]
        return bool(await self._remove_user(keys=keys, args=[self.prefix, user]))

    async def list_users(self) -> list[UserRecord]:
        flat: list[bytes] = await self._list_users(keys=[self._key("users")], args=[self.prefix])
        return [UserRecord(_user(flat[i]), flat[i + 1] == b"1", flat[i + 2] == b"1") for i in range(0, len(flat), 3)]

    # -- presence ------------------------------------------------------------------

    async def get_presence(self, user: UserId) -> PresenceDocument | None:
        body = await self._get(self._key("presence", user))
        return None if body is None else codec.decode_presence_view(body)

    async def put_presence(self, user: UserId, doc: PresenceDocument, lease_deadline: int | None) -> None:
        body = codec.encode_presence(doc)
        async with self._redis.pipeline(transaction=True) as tx:
            tx.set(self._key("presence", user), body)
            if lease_deadline is None:
                tx.zrem(self._key("leases"), user)
            else:
                tx.zadd(self._key("leases"), {user: lease_deadline})
            await tx.execute()

    async def due_leases(self, now: int) -> list[UserId]:
        reply = self._redis.zrangebyscore(self._key("leases"), "-inf", now)
        users = await cast("Awaitable[list[bytes]]", reply)
        return [_user(u) for u in users]

    # -- access rules --------------------------------------------------------------

    async def get_rules(self, user: UserId) -> AccessRules | None:
        body = await self._get(self._key("rules", user))
        return None if body is None else codec.decode_rules(body)

    async def put_rules(self, user: UserId, rules: AccessRules) -> None:
        await self._redis.set(self._key("rules", user), codec.encode_rules(rules))

    # -- published public keys ------------------------------------------------------

    async def get_key_bundle(self, user: UserId) -> bytes | None:
        return await self._get(self._key("keys", user))

    async def put_key_bundle(self, user: UserId, bundle: bytes) -> None:
        await self._redis.set(self._key("keys", user), bundle)

    # -- contacts ------------------------------------------------------------------

    async def get_contacts(self, user: UserId) -> tuple[UserId, ...]:
        body = await self._get(self._key("contacts", user))
        return () if body is None else codec.decode_contacts(body)

    async def put_contacts(self, user: UserId, contacts: tuple[UserId, ...]) -> None:
        await self._redis.set(self._key("contacts", user), codec.encode_contacts(contacts))

    # -- instant messages ----------------------------------------------------------

    async def enqueue(
        self, message: InstantMessage, body: bytes, received: int, expires: int | None, expect: SendFacts | None = None
    ) -> EnqueueResult:
        keys = [
            self._key("dedup", message.sender),
            self._key("seq"),
            self._key("inbox", message.recipient),
            self._key("out", message.sender),
            self._key("expiry"),
        ]
        args: list[str | bytes | int] = [
            self.prefix,
            bytes(message.msg_id),
            message.sender,
            message.recipient,
            body,
            received,
            "" if expires is None else expires,
        ]
        if expect is not None:
            keys += [
                self._key("user", message.sender),
                self._key("user", message.recipient),
                self._key("rules", message.recipient),
            ]
            stored = expect.rules_stored
            args += [_flags(expect.sender), _flags(expect.recipient), "0" if stored is None else "1", stored or b""]
        seq, outcome = await self._enqueue(keys=keys, args=args)
        if outcome == 2:
            raise FactsChanged()
        if outcome < 0:
            raise Conflict("message id already used for another message")
        return EnqueueResult(Seq(seq), newly_stored=outcome == 1)

    async def pending(self, recipient: UserId, after: Seq, limit: int) -> list[QueuedMessage]:
        if limit == 0:
            return []
        flat: list[bytes] = await self._pending(
            keys=[self._key("inbox", recipient)], args=[self.prefix, after, max(limit, -1)]
        )
        return [
            QueuedMessage(Seq(int(flat[i])), codec.decode_message(flat[i + 1], recipient), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def acknowledge(self, recipient: UserId, upto: Seq, now: int) -> list[UserId]:
        keys = [self._key("inbox", recipient), self._key("expiry")]
        senders: dict[UserId, None] = {}
        while True:
            taken, batch = await self._acknowledge(keys=keys, args=[self.prefix, upto, now, self.batch])
            senders.update((_user(s), None) for s in batch)
            if taken < self.batch:
                return list(senders)

    async def records(self, sender: UserId, limit: int) -> list[DeliveryRecord]:
        if limit == 0:
            return []
        last = -1 if limit < 0 else limit - 1
        flat: list[bytes] = await self._records(keys=[self._key("out", sender)], args=[self.prefix, last])
        return [
            DeliveryRecord(
                MessageId(bytes(flat[i])),
                _user(flat[i + 1]),
                DeliveryState(int(flat[i + 2])),
                FailureReason(int(flat[i + 3])),
                int(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    async def expire_messages(self, now: int) -> list[tuple[UserId, UserId]]:
        affected: dict[tuple[UserId, UserId], None] = {}
        while True:
            reply: list[Any] = await self._expire(keys=[self._key("expiry")], args=[self.prefix, now, self.batch])
            affected.update(((_user(s), _user(r)), None) for s, r in _pairs(reply[1:]))
            if reply[0] < self.batch:
                return list(affected)

    async def close(self) -> None:
        await self._redis.aclose()


def _pairs(flat: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


__all__ = ["DEFAULT_PREFIX", "LAYOUT_VERSION", "RedisStore", "parse_url"]


def _flags(record: UserRecord | None) -> str:
    """A user hash's presentity and inbox fields as the enqueue script reads them."""
    return "" if record is None else f"{int(record.has_presentity)}{int(record.has_inbox)}"


def _bounded(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def bounded(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        # One connection at a time per call (no call runs commands concurrently).
        async with asyncio.timeout(CALL_TIMEOUT_S), self._slots:
            return await method(self, *args, **kwargs)

    return bounded


# Every public store call: bounded in time and in connections.
for _name, _method in list(vars(RedisStore).items()):
    if not _name.startswith("_") and asyncio.iscoroutinefunction(_method) and _name not in ("open", "close"):
        setattr(RedisStore, _name, _bounded(_method))
