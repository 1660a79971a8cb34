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
