"""Access rules (sans-IO): decisions, views, polite blocking, rules codec."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import access, codec
from gateway.core.access import AccessRules, Field, ReadKind, Verdict, View
from gateway.core.errors import CodecError
from gateway.core.ids import UserId
from gateway.core.model import Contact, PresenceDocument, Status

OWNER, A, C = UserId("b@x.org"), UserId("a@x.org"), UserId("c@y.org")
DOC = PresenceDocument(
    Status.OPEN,
    note="real",
    contact=Contact(tel="1", email="e", url="u", adr="a"),
    extensions={"k": 1},
    timestamp=5,
    version=9,
)


def test_default_rules_let_authenticated_principals_read_but_not_anonymous() -> None:
    rules = access.DEFAULT_RULES
    for kind in ReadKind:
        assert access.decide_read(rules, OWNER, A, kind).verdict is Verdict.GRANTED
        assert access.decide_read(rules, OWNER, None, kind).verdict is Verdict.AUTHENTICATE


def test_anonymous_subscribers_only_when_allowed() -> None:
    rules = AccessRules(subscribers=("*", "anonymous"), fetchers=("*",))
    assert access.decide_read(rules, OWNER, None, ReadKind.SUBSCRIBE).verdict is Verdict.GRANTED
    assert access.decide_read(rules, OWNER, None, ReadKind.FETCH).verdict is Verdict.AUTHENTICATE
    blocked = AccessRules(subscribers=("*", "anonymous"), refused=("anonymous",))
    assert access.decide_read(blocked, OWNER, None, ReadKind.SUBSCRIBE).verdict is Verdict.REFUSED


def test_fetch_and_subscribe_are_controlled_separately() -> None:
    rules = AccessRules(fetchers=("a@x.org",), subscribers=("*@y.org",))
    assert access.decide_read(rules, OWNER, A, ReadKind.FETCH).verdict is Verdict.GRANTED
    assert access.decide_read(rules, OWNER, A, ReadKind.SUBSCRIBE).verdict is Verdict.REFUSED
    assert access.decide_read(rules, OWNER, C, ReadKind.SUBSCRIBE).verdict is Verdict.GRANTED
    assert access.decide_read(rules, OWNER, C, ReadKind.FETCH).verdict is Verdict.REFUSED


def test_refusal_beats_block_beats_grant_and_owner_always_sees() -> None:
    rules = AccessRules(refused=("a@x.org",), blocked=("*",))
    assert access.decide_read(rules, OWNER, A, ReadKind.SUBSCRIBE).verdict is Verdict.REFUSED
    assert access.decide_read(rules, OWNER, C, ReadKind.SUBSCRIBE).verdict is Verdict.POLITELY_BLOCKED
    assert access.decide_read(rules, OWNER, OWNER, ReadKind.FETCH) == access.ReadDecision(Verdict.GRANTED)


def test_most_specific_view_wins_and_filters_fields() -> None:
    rules = AccessRules(
        views={"*": View(Field.NOTE), "*@x.org": View(Field.NOTE | Field.TEL), "a@x.org": View(Field(0), note="busy")}
    )
    seen_by_a = access.apply_view(DOC, access.decide_read(rules, OWNER, A, ReadKind.FETCH).view)
    assert (seen_by_a.note, seen_by_a.contact, dict(seen_by_a.extensions)) == ("busy", Contact(), {})
    seen_by_c = access.apply_view(DOC, access.decide_read(rules, OWNER, C, ReadKind.FETCH).view)
    assert (seen_by_c.note, seen_by_c.contact) == ("real", Contact())
    domain_view = access.view_for(rules, UserId("d@x.org"))
    assert access.apply_view(DOC, domain_view).contact == Contact(tel="1")
    assert seen_by_a.status is DOC.status and seen_by_a.version == DOC.version


def test_polite_view_keeps_cadence_but_shows_nothing() -> None:
    fake = access.polite_view(DOC)
    assert fake == PresenceDocument(Status.CLOSED, timestamp=DOC.timestamp, version=DOC.version)


def test_publish_send_and_read_permissions() -> None:
    rules = AccessRules(publishers=(A,), senders=("*@x.org",), blocked_senders=("a@x.org",), readers=(C,))
    assert access.may_publish(rules, OWNER, A) and access.may_publish(rules, OWNER, OWNER)
    assert not access.may_publish(rules, OWNER, C) and not access.may_publish(rules, OWNER, None)
    assert not access.may_send(rules, OWNER, A)  # blocked from messaging (5.4.11)
    assert access.may_send(rules, OWNER, UserId("d@x.org"))
    assert not access.may_send(rules, OWNER, C) and not access.may_send(rules, OWNER, None)
    assert access.may_read_inbox(rules, OWNER, C) and not access.may_read_inbox(rules, OWNER, A)


def test_rules_codec_round_trip_and_defaults() -> None:
    rules = AccessRules(
        fetchers=("*", "anonymous"),
        subscribers=("*@x.org",),
        publishers=(A,),
        refused=(C,),
        blocked=("d@x.org",),
        views={"a@x.org": View(Field.NOTE, note="hi")},
        senders=("*",),
        blocked_senders=(C,),
        readers=(A,),
    )
    assert codec.decode_rules(codec.encode_rules(rules)) == rules
    assert codec.decode_rules(cbor2.dumps({})) == access.DEFAULT_RULES


@pytest.mark.parametrize(
    "body",
    [
        {0: "*"},
        {0: ["not a pattern"]},
        {0: ["*@bad_domain"]},
        {2: ["*"]},
        {5: {"*": {0: 64}}},
        {9: []},
        {0: ["*"] * 65},
    ],
)
def test_bad_rules_are_rejected(body: object) -> None:
    with pytest.raises(CodecError):
        codec.decode_rules(cbor2.dumps(body))


@given(st.sampled_from(["a@x.org", "c@y.org", None, "d@x.org"]), st.sampled_from(ReadKind))
def test_decisions_never_grant_what_is_refused(requester: str | None, kind: ReadKind) -> None:
    rules = AccessRules(refused=("*@x.org",), subscribers=("*", "anonymous"), fetchers=("*", "anonymous"))
    verdict = access.decide_read(rules, OWNER, UserId(requester) if requester else None, kind).verdict
    if requester is not None and requester.endswith("@x.org"):
        assert verdict is Verdict.REFUSED
    else:
        assert verdict is Verdict.GRANTED
