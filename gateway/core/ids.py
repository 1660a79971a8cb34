"""Identifiers: ``user@domain`` (RFC 2779 2.1: an identifier names a principal in a domain).

>>> parse_user_id("Alice@Example.ORG")
'Alice@example.org'
>>> parse_user_id("no-domain")
Traceback (most recent call last):
...
gateway.core.errors.BadRequest: identifier must be user@domain
"""

from __future__ import annotations

import re
from typing import NewType

from .errors import BadRequest

UserId = NewType("UserId", str)
Domain = NewType("Domain", str)

MAX_ID_LENGTH = 64
_LOCAL = re.compile(r"^[A-Za-z0-9._+-]{1,32}$")
# A DNS name: labels of letters, digits and hyphens, not starting or ending with '-'.
_DOMAIN = re.compile(r"^(?=.{1,63}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_domain(text: str) -> Domain:
    domain = text.lower()
    if not _DOMAIN.fullmatch(domain):
        raise BadRequest("bad domain")
    return Domain(domain)


def parse_user_id(text: str) -> UserId:
    """Validate and normalise an identifier (the domain part is case-insensitive)."""
    if len(text) > MAX_ID_LENGTH:
        raise BadRequest("identifier too long")
    local, sep, domain = text.partition("@")
    if not sep:
        raise BadRequest("identifier must be user@domain")
    if not _LOCAL.fullmatch(local):
        raise BadRequest("bad user part")
    return UserId(f"{local}@{parse_domain(domain)}")


def domain_of(user: UserId) -> Domain:
    return Domain(user.partition("@")[2])


# -- short addresses in paths (docs/protocol.md 1.2) ------------------------------------
#
# A path segment naming a user may be shortened: ``alice`` is alice in the requester's
# own domain, ``3`` is the requester's contact 3 (``/c``), and no segment at all is the
# requester itself. Every form costs the same once resolved; the short ones cost fewer
# bytes on the air.

_ALIAS = re.compile(r"^[1-9][0-9]{0,2}$")


class Address:
    """A parsed user segment: exactly one of ``user``, ``local`` or ``alias`` is set
    (all None: the requester itself)."""

    __slots__ = ("alias", "local", "user")

    def __init__(self, user: UserId | None = None, local: str | None = None, alias: int | None = None) -> None:
        self.user, self.local, self.alias = user, local, alias

    def __repr__(self) -> str:
        return f"Address(user={self.user!r}, local={self.local!r}, alias={self.alias!r})"


def parse_address(segments: list[str] | tuple[str, ...]) -> Address:
    """The user named by a resource path's user segments (none or one)."""
    if not segments:
        return Address()
    if len(segments) > 1:
        raise BadRequest("path must be /{prefix}/user: one user segment at most")
    text = segments[0]
    if "@" in text:
        return Address(user=parse_user_id(text))
    if _ALIAS.fullmatch(text):
        return Address(alias=int(text))
    if not _LOCAL.fullmatch(text):
        raise BadRequest("path must name user@domain, a user of your domain or a contact number")
    return Address(local=text)


def in_domain(local: str, domain: Domain) -> UserId:
    return parse_user_id(f"{local}@{domain}")
