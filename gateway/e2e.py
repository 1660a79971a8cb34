"""End-to-end protection between devices: COSE (RFC 9052/9053) that the gateway stores but cannot read or forge.

Theory of operation
-------------------
RFC 2779 asks that a watcher can verify presence information and notifications as sent by the presentity
(5.3.1, 5.3.3), that no principal C can see (5.4.6) or undetectably tamper with (5.4.7) an IM, and that A can
sign it with an existing standard (5.4.9). The gateway routes but is not trusted with content: it stores and
forwards opaque bytes and publishes each user's :class:`KeyBundle`. This module is the device side; it never
touches the network, the clock or global randomness (random bytes come from an ``urandom`` argument that
defaults to :func:`os.urandom`).

Each device holds two long-term keys and publishes their public halves as one bundle:

* :class:`SigningKey` (Ed25519). :meth:`SigningKey.sign` makes a tagged COSE_Sign1 (CBOR tag 18):
  protected ``{1: -8}`` (alg EdDSA, nothing else), unprotected ``{4: kid}``. :func:`verify` checks the tag,
  the exact protected header, the kid against the signer's COSE_Key and the signature over the RFC 9052
  section 4.4 Sig_structure. Non-repudiable: anyone holding A's bundle can check it.
* :class:`AgreementKey` (X25519). :meth:`AgreementKey.encrypt_for` makes a tagged COSE_Encrypt0 (tag 16)
  with AES-CCM-16-64-128 (alg 10: 128-bit key, 64-bit tag, 13-byte nonce): protected ``{1: 10}``,
  unprotected ``{4: sender kid, 5: IV}``. Only A and B can compute the key, so it authenticates A to B
  and hides the content from everybody else, the gateway included; but B could have made it too, so it
  is deniable, not a signature.
* :func:`seal` signs, then encrypts (COSE_Encrypt0 around a COSE_Sign1) for IMs that must be private
  and non-repudiable; :func:`open_sealed` reverses it against one sender bundle. The inner signature
  covers the recipient's agreement key as external_aad (:func:`seal_external_aad`), so B cannot
  re-encrypt A's signed message to C and pass it off as sent to C ("surreptitious forwarding";
  RFC 2779 appendix E1, "Alice intended to send the message to Bob").

Key derivation for Encrypt0 (ECDH-SS + HKDF-256 of RFC 9053 section 6.3, key derived directly)::

    Z   = X25519(sender static private, recipient static public)      RFC 7748; all-zero Z is refused
    ctx = COSE_KDF_Context (RFC 9053 section 5.2) =
          [ 10,                                    AlgorithmID: AES-CCM-16-64-128
            [ sender kid,    IV,  sender x ],      PartyUInfo [identity, nonce, other]
            [ recipient kid, nil, recipient x ],   PartyVInfo
            [ 128, h'a1010a', 'impp-e2e' ] ]       SuppPubInfo [keyDataLength, protected, other]
    K   = HKDF-SHA-256(salt = none, IKM = Z, info = CBOR(ctx), L = 16)  RFC 5869
    COSE_Encrypt0 = AES-CCM-16-64-128(K, nonce = IV, aad = Enc_structure ["Encrypt0", h'a1010a', external_aad])

The per-message random 13-byte IV doubles as the PartyU nonce (RFC 9053 wants a salt or PartyU nonce unique
per key pair for ECDH-SS), so each message gets its own key at no extra bytes. Ordering the parties
(U = sender, V = recipient) and binding both public keys makes A->B and B->A keys differ even if two kids
collide, so a message cannot be reflected back to its sender. The SuppPubInfo ``other`` label separates
these keys from any other use of the same X25519 keys.

The kid defaults to the first 4 bytes of the RFC 9679 COSE Key Thumbprint (SHA-256 over the
deterministic encoding of kty, crv, x); an application may choose a shorter one (``kid=``). Security never
rests on the kid: it selects a key, and is checked and bound, but the keys themselves decide.

Not covered here: replay and freshness (bind an IM id or counter through ``external_aad``), key
rotation policy, and the gateway publishing someone else's public key under a user's name (bundles carry
no self-signature or proof of possession; a device that must resist that pins keys out of band).

Messages, keys and bundles are accepted only in the deterministic encoding this module makes (RFC 8949
section 4.2.1), so each has one byte string: nobody can re-encode the unprotected parts undetected.

On untrusted input :func:`verify` raises only :class:`VerificationError`,
:meth:`AgreementKey.decrypt_from` only :class:`DecryptionError`, :func:`open_sealed` only one of those two,
and :meth:`KeyBundle.decode` only :class:`BundleError`; all derive from :class:`E2EError` (a ``ValueError``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

__all__ = [
    "CONTENT_FORMAT_COSE_ENCRYPT0",
    "CONTENT_FORMAT_COSE_SIGN1",
    "AgreementKey",
    "BundleError",
    "DecryptionError",
    "E2EError",
    "KeyBundle",
    "SigningKey",
    "VerificationError",
    "open_sealed",
    "seal",
    "seal_external_aad",
    "verify",
]

# --- Registries -------------------------------------------------------------------------------------------


class CoseTag(IntEnum):
    """CBOR tags of COSE messages (IANA CBOR Tags registry; RFC 9052 section 2)."""

    ENCRYPT0 = 16
    SIGN1 = 18


class CoseAlg(IntEnum):
    """IANA COSE Algorithms registry (RFC 9053)."""

    EDDSA = -8  # section 2.2
    AES_CCM_16_64_128 = 10  # section 4.2
    ECDH_SS_HKDF_256 = -27  # section 6.3; the construction this module follows for Encrypt0


class CoseHeader(IntEnum):
    """IANA COSE Header Parameters registry (RFC 9052 section 3.1)."""

    ALG = 1
    KID = 4
    IV = 5


class CoseKeyParam(IntEnum):
    """IANA COSE Key Common Parameters (RFC 9052 section 7.1) and OKP Key Type Parameters (RFC 9053 7.2)."""

    KTY = 1
    KID = 2
    ALG = 3
    CRV = -1
    X = -2


class CoseKeyType(IntEnum):
    """IANA COSE Key Types registry (RFC 9053 section 7)."""

    OKP = 1


class CoseCurve(IntEnum):
    """IANA COSE Elliptic Curves registry (RFC 9053 section 7.1)."""

    X25519 = 4
    ED25519 = 6


# IANA CoAP Content-Formats registry (COSE entries from RFC 8152, kept by RFC 9052): the IM content-format field.
CONTENT_FORMAT_COSE_ENCRYPT0 = 16  # application/cose; cose-type="cose-encrypt0"
CONTENT_FORMAT_COSE_SIGN1 = 18  # application/cose; cose-type="cose-sign1"

# --- Profile constants ------------------------------------------------------------------------------------

KEY_BYTES = 32  # Ed25519 and X25519 public and private keys (RFC 8032, RFC 7748)
SIGNATURE_BYTES = 64
CEK_BYTES = 16  # AES-CCM-16-64-128
TAG_BYTES = 8
NONCE_BYTES = 13  # 15 - L with L = 2 (RFC 9053 section 4.2)
DEFAULT_KID_BYTES = 4
MAX_KID_BYTES = 16
MAX_PLAINTEXT = 32 * 1024  # what sign and encrypt_for accept, so that what they make stays under MAX_INPUT
MAX_SEALED_PLAINTEXT = MAX_PLAINTEXT - 256  # room for the inner COSE_Sign1 around it
MAX_INPUT = 64 * 1024  # untrusted COSE bytes longer than this are refused before decoding
MAX_DEPTH = 6
KDF_LABEL = b"impp-e2e"  # SuppPubInfo.other (RFC 9053 section 5.2): separates these keys from other uses
SEAL_LABEL = "impp-e2e seal"

_SIGN1_PROTECTED = bytes.fromhex("a10127")  # {1: -8}
_ENC0_PROTECTED = bytes.fromhex("a1010a")  # {1: 10}

Urandom = Callable[[int], bytes]

# --- Errors -----------------------------------------------------------------------------------------------


class E2EError(ValueError):
    """Base of every error this module raises on untrusted input."""


class VerificationError(E2EError):
    """A COSE_Sign1 is malformed, outside this profile, from another key, or its signature is wrong."""


class DecryptionError(E2EError):
    """A COSE_Encrypt0 is malformed, outside this profile, not from this sender to us, or was altered."""


class BundleError(E2EError):
    """A key bundle or COSE_Key is malformed or outside this profile."""


# --- CBOR and COSE helpers --------------------------------------------------------------------------------


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _loads(data: bytes, error: type[E2EError], what: str) -> Any:
    """Decode one strict CBOR item (no duplicate keys, no indefinite lengths, no trailing bytes)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what}: bytes expected")
    data = bytes(data)
    if not data:
        raise error(f"{what}: empty")
    if len(data) > MAX_INPUT:
        raise error(f"{what}: over {MAX_INPUT} bytes")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH, allow_duplicate_keys=False, allow_indefinite=False)
        value = decoder.decode()
    except Exception as exc:  # cbor2 raises several types on garbage; all mean one thing here
        raise error(f"{what}: malformed CBOR") from exc
    if stream.tell() != len(data):
        raise error(f"{what}: trailing bytes")
    return value


def _header(value: object, allowed: set[int], error: type[E2EError], what: str) -> dict[int, bytes]:
    """A header map with exactly ``allowed`` integer labels, each a byte string."""
    if not isinstance(value, Mapping) or any(type(k) is not int for k in value) or set(value) != allowed:
        raise error(f"{what}: header labels must be exactly {sorted(int(label) for label in allowed)}")
    if any(type(v) is not bytes for v in value.values()):
        raise error(f"{what}: header values must be byte strings")
    return dict(value)


def _message(data: bytes, tag: CoseTag, length: int, error: type[E2EError]) -> list[Any]:
    item = _loads(data, error, tag.name)
    if not isinstance(item, cbor2.CBORTag) or item.tag != tag:
        raise error(f"CBOR tag {int(tag)} ({tag.name}) expected")
    if not isinstance(item.value, list | tuple) or len(item.value) != length:
        raise error(f"{tag.name}: array of {length} expected")
    return list(item.value)


def _bstr(value: object, error: type[E2EError], what: str) -> bytes:
    if type(value) is not bytes:
        raise error(f"{what}: byte string expected")
    return value


def _cose_message(tag: CoseTag, items: list[object]) -> bytes:
    """A tagged COSE message in deterministic encoding: the only encoding this module makes or accepts."""
    return _dumps(cbor2.CBORTag(int(tag), items))


def _sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    """ToBeSigned for COSE_Sign1 (RFC 9052 section 4.4)."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def _enc_structure(protected: bytes, external_aad: bytes) -> bytes:
    """Additional data for COSE_Encrypt0 (RFC 9052 section 5.3)."""
    return cbor2.dumps(["Encrypt0", protected, external_aad])


def _encrypt0(key: bytes, unprotected: dict[int, bytes], plaintext: bytes, external_aad: bytes = b"") -> bytes:
    """COSE_Encrypt0 with AES-CCM-16-64-128 under ``key``; the nonce is ``unprotected[IV]``."""
    nonce = unprotected[CoseHeader.IV]
    ciphertext = AESCCM(key, tag_length=TAG_BYTES).encrypt(
        nonce, plaintext, _enc_structure(_ENC0_PROTECTED, external_aad)
    )
    return _cose_message(CoseTag.ENCRYPT0, [_ENC0_PROTECTED, unprotected, ciphertext])


def _check_kid(kid: bytes) -> bytes:
    if type(kid) is not bytes or not 1 <= len(kid) <= MAX_KID_BYTES:
        raise ValueError(f"kid must be 1..{MAX_KID_BYTES} bytes")
    return kid


def _check_plaintext(data: bytes, what: str, limit: int = MAX_PLAINTEXT) -> None:
    if not isinstance(data, bytes):
        raise TypeError(f"{what} must be bytes")
    if len(data) > limit:
        raise ValueError(f"{what} over {limit} bytes")


def _random(urandom: Urandom, size: int) -> bytes:
    value = urandom(size)
    if type(value) is not bytes or len(value) != size:
        raise ValueError(f"urandom returned something other than {size} bytes")
    return value


# --- COSE_Key ---------------------------------------------------------------------------------------------


def thumbprint(crv: CoseCurve, x: bytes) -> bytes:
    """COSE Key Thumbprint (RFC 9679) of an OKP public key: SHA-256 of the deterministic {kty, crv, x}."""
    required: dict[int, object] = {CoseKeyParam.KTY: CoseKeyType.OKP, CoseKeyParam.CRV: crv, CoseKeyParam.X: x}
    return hashlib.sha256(_dumps(required)).digest()


def _cose_key(crv: CoseCurve, kid: bytes, x: bytes) -> bytes:
    return _dumps(
        {
            CoseKeyParam.KTY.value: CoseKeyType.OKP.value,
            CoseKeyParam.KID.value: kid,
            CoseKeyParam.CRV.value: crv.value,
            CoseKeyParam.X.value: x,
        }
    )


_KEY_ALG = {CoseCurve.ED25519: CoseAlg.EDDSA, CoseCurve.X25519: CoseAlg.ECDH_SS_HKDF_256}
_KEY_REQUIRED = {CoseKeyParam.KTY, CoseKeyParam.KID, CoseKeyParam.CRV, CoseKeyParam.X}
_KEY_ALLOWED = _KEY_REQUIRED | {CoseKeyParam.ALG}


def _key_fields(value: object, crv: CoseCurve) -> tuple[bytes, bytes]:
    """(kid, x) of a decoded public OKP COSE_Key on ``crv``; raises BundleError."""
    if not isinstance(value, Mapping) or any(type(k) is not int for k in value):
        raise BundleError("COSE_Key: map with integer labels expected")
    labels = set(value)
    if not _KEY_REQUIRED <= labels or not labels <= _KEY_ALLOWED:
        raise BundleError("COSE_Key: exactly kty, kid, crv, x (and optionally alg) expected; no private key")
    kid, x = value[CoseKeyParam.KID], value[CoseKeyParam.X]
    expected = {CoseKeyParam.KTY: CoseKeyType.OKP, CoseKeyParam.CRV: crv, CoseKeyParam.ALG: _KEY_ALG[crv]}
    for label, want in expected.items():
        if label in value and (type(value[label]) is not int or value[label] != want):
            raise BundleError(f"COSE_Key: {label.name.lower()} {want.name} expected")
    if type(kid) is not bytes or not 1 <= len(kid) <= MAX_KID_BYTES:
        raise BundleError(f"COSE_Key: kid of 1..{MAX_KID_BYTES} bytes expected")
    if type(x) is not bytes or len(x) != KEY_BYTES:
        raise BundleError(f"COSE_Key: x of {KEY_BYTES} bytes expected")
    return kid, x


def _parse_key(data: bytes, crv: CoseCurve) -> tuple[bytes, bytes]:
    """(kid, x) of a public OKP COSE_Key in deterministic encoding; raises BundleError."""
    value = _loads(data, BundleError, "COSE_Key")
    kid, x = _key_fields(value, crv)
    if _dumps(value) != bytes(data):
        raise BundleError("COSE_Key: not in deterministic encoding (RFC 8949 section 4.2.1)")
    return kid, x


# --- Signing ----------------------------------------------------------------------------------------------


class SigningKey:
    """An Ed25519 private key and its kid; signs COSE_Sign1 messages."""

    __slots__ = ("_key", "kid")

    def __init__(self, key: Ed25519PrivateKey, kid: bytes | None = None) -> None:
        self._key = key
        x = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = _check_kid(thumbprint(CoseCurve.ED25519, x)[:DEFAULT_KID_BYTES] if kid is None else kid)

    @classmethod
    def generate(cls, *, kid: bytes | None = None, urandom: Urandom = os.urandom) -> SigningKey:
        return cls.from_private_bytes(_random(urandom, KEY_BYTES), kid=kid)

    @classmethod
    def from_private_bytes(cls, data: bytes, *, kid: bytes | None = None) -> SigningKey:
        """From the 32-byte RFC 8032 private key (the seed)."""
        if len(data) != KEY_BYTES:
            raise ValueError(f"Ed25519 private key must be {KEY_BYTES} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(data)), kid)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def public_cose_key(self) -> bytes:
        """COSE_Key {1: 1 (OKP), 2: kid, -1: 6 (Ed25519), -2: x}, deterministic encoding."""
        return _cose_key(CoseCurve.ED25519, self.kid, self.public_bytes())

    def sign(self, payload: bytes, *, external_aad: bytes = b"") -> bytes:
        """Tagged COSE_Sign1 over ``payload``; ``external_aad`` is signed but not sent."""
        _check_plaintext(payload, "payload")
        signature = self._key.sign(_sig_structure(_SIGN1_PROTECTED, external_aad, payload))
        unprotected = {CoseHeader.KID.value: self.kid}
        return _cose_message(CoseTag.SIGN1, [_SIGN1_PROTECTED, unprotected, payload, signature])

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid.hex()})"


def verify(cose_sign1: bytes, public_cose_key: bytes, *, external_aad: bytes = b"") -> bytes:
    """The payload of a tagged COSE_Sign1 signed by ``public_cose_key``; raises only VerificationError."""
    try:
        kid, x = _parse_key(public_cose_key, CoseCurve.ED25519)
    except BundleError as exc:
        raise VerificationError(f"signer key: {exc}") from exc
    protected, unprotected, payload, signature = _message(cose_sign1, CoseTag.SIGN1, 4, VerificationError)
    if protected != _SIGN1_PROTECTED:
        raise VerificationError("COSE_Sign1: protected header must be exactly {1: -8} (EdDSA)")
    header = _header(unprotected, {CoseHeader.KID}, VerificationError, "COSE_Sign1")
    if header[CoseHeader.KID] != kid:
        raise VerificationError("COSE_Sign1: kid does not name the signer key")
    payload = _bstr(payload, VerificationError, "COSE_Sign1 payload")  # nil (detached) is not in this profile
    signature = _bstr(signature, VerificationError, "COSE_Sign1 signature")
    if len(signature) != SIGNATURE_BYTES:
        raise VerificationError(f"COSE_Sign1: {SIGNATURE_BYTES}-byte signature expected")
    if _cose_message(CoseTag.SIGN1, [protected, header, payload, signature]) != bytes(cose_sign1):
        raise VerificationError("COSE_Sign1: not in deterministic encoding (RFC 8949 section 4.2.1)")
    try:
        Ed25519PublicKey.from_public_bytes(x).verify(signature, _sig_structure(protected, external_aad, payload))
    except (InvalidSignature, ValueError) as exc:
        raise VerificationError("COSE_Sign1: bad signature") from exc
    return payload


# --- Encryption -------------------------------------------------------------------------------------------


def _derive_cek(shared: bytes, sender: tuple[bytes, bytes], recipient: tuple[bytes, bytes], iv: bytes) -> bytes:
    """The content key: HKDF-SHA-256 over the COSE_KDF_Context of the module docstring."""
    (sender_kid, sender_x), (recipient_kid, recipient_x) = sender, recipient
    context = [
        CoseAlg.AES_CCM_16_64_128.value,
        [sender_kid, iv, sender_x],
        [recipient_kid, None, recipient_x],
        [CEK_BYTES * 8, _ENC0_PROTECTED, KDF_LABEL],
    ]
    return HKDF(algorithm=hashes.SHA256(), length=CEK_BYTES, salt=None, info=cbor2.dumps(context)).derive(shared)


class AgreementKey:
    """An X25519 private key and its kid; encrypts COSE_Encrypt0 to, and decrypts from, other devices."""

    __slots__ = ("_key", "kid")

    def __init__(self, key: X25519PrivateKey, kid: bytes | None = None) -> None:
        self._key = key
        x = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = _check_kid(thumbprint(CoseCurve.X25519, x)[:DEFAULT_KID_BYTES] if kid is None else kid)

    @classmethod
    def generate(cls, *, kid: bytes | None = None, urandom: Urandom = os.urandom) -> AgreementKey:
        return cls.from_private_bytes(_random(urandom, KEY_BYTES), kid=kid)

    @classmethod
    def from_private_bytes(cls, data: bytes, *, kid: bytes | None = None) -> AgreementKey:
        """From the 32-byte RFC 7748 private scalar."""
        if len(data) != KEY_BYTES:
            raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes")
        return cls(X25519PrivateKey.from_private_bytes(bytes(data)), kid)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def public_cose_key(self) -> bytes:
        """COSE_Key {1: 1 (OKP), 2: kid, -1: 4 (X25519), -2: x}, deterministic encoding."""
        return _cose_key(CoseCurve.X25519, self.kid, self.public_bytes())

    def _shared(self, peer_x: bytes) -> bytes:
        # cryptography refuses an all-zero result (a low-order peer point, RFC 7748 section 6.1) with ValueError.
        return self._key.exchange(X25519PublicKey.from_public_bytes(peer_x))

    def encrypt_for(
        self,
        recipient_public_cose_key: bytes,
        plaintext: bytes,
        *,
        sender_kid: bytes | None = None,
        nonce: bytes | None = None,
        external_aad: bytes = b"",
        urandom: Urandom = os.urandom,
    ) -> bytes:
        """Tagged COSE_Encrypt0 of ``plaintext`` that only the holder of the recipient key (and we) can open.

        ``sender_kid`` is the kid the recipient knows our agreement key by; it is sent and bound into the
        key, so it must be ours (it defaults to ``self.kid``, anything else is a ValueError). ``nonce`` is
        the 13-byte IV, random from ``urandom`` when not given; never reuse one with the same key pair.
        A malformed recipient key raises BundleError.
        """
        _check_plaintext(plaintext, "plaintext")
        if sender_kid is not None and sender_kid != self.kid:
            raise ValueError("sender_kid must be this key's kid (the one in its published COSE_Key)")
        recipient = _parse_key(recipient_public_cose_key, CoseCurve.X25519)
        iv = _random(urandom, NONCE_BYTES) if nonce is None else nonce
        if type(iv) is not bytes or len(iv) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
        try:
            shared = self._shared(recipient[1])
        except ValueError as exc:
            raise BundleError("recipient key is a low-order point") from exc
        cek = _derive_cek(shared, (self.kid, self.public_bytes()), recipient, iv)
        unprotected = {CoseHeader.KID.value: self.kid, CoseHeader.IV.value: iv}
        return _encrypt0(cek, unprotected, plaintext, external_aad)

    def decrypt_from(self, sender_public_cose_key: bytes, cose_encrypt0: bytes, *, external_aad: bytes = b"") -> bytes:
        """The plaintext of a COSE_Encrypt0 made for us by ``sender_public_cose_key``; raises only DecryptionError."""
        try:
            sender = _parse_key(sender_public_cose_key, CoseCurve.X25519)
        except BundleError as exc:
            raise DecryptionError(f"sender key: {exc}") from exc
        protected, unprotected, ciphertext = _message(cose_encrypt0, CoseTag.ENCRYPT0, 3, DecryptionError)
        if protected != _ENC0_PROTECTED:
            raise DecryptionError("COSE_Encrypt0: protected header must be exactly {1: 10} (AES-CCM-16-64-128)")
        header = _header(unprotected, {CoseHeader.KID, CoseHeader.IV}, DecryptionError, "COSE_Encrypt0")
        if header[CoseHeader.KID] != sender[0]:
            raise DecryptionError("COSE_Encrypt0: kid does not name the sender key")
        iv = header[CoseHeader.IV]
        ciphertext = _bstr(ciphertext, DecryptionError, "COSE_Encrypt0 ciphertext")
        if len(iv) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
            raise DecryptionError(f"COSE_Encrypt0: {NONCE_BYTES}-byte IV and at least a {TAG_BYTES}-byte tag expected")
        if _cose_message(CoseTag.ENCRYPT0, [protected, header, ciphertext]) != bytes(cose_encrypt0):
            raise DecryptionError("COSE_Encrypt0: not in deterministic encoding (RFC 8949 section 4.2.1)")
        try:
            shared = self._shared(sender[1])
        except ValueError as exc:
            raise DecryptionError("sender key is a low-order point") from exc
        cek = _derive_cek(shared, sender, (self.kid, self.public_bytes()), iv)
        try:
            return AESCCM(cek, tag_length=TAG_BYTES).decrypt(iv, ciphertext, _enc_structure(protected, external_aad))
        except InvalidTag as exc:
            raise DecryptionError("COSE_Encrypt0: not from this sender to this key, or altered") from exc

    def __repr__(self) -> str:
        return f"AgreementKey(kid={self.kid.hex()})"


# --- Bundles ----------------------------------------------------------------------------------------------


class BundleKey(IntEnum):
    """Labels of the key bundle map the gateway publishes."""

    SIGNING = 0
    AGREEMENT = 1


@dataclass(frozen=True, slots=True)
class KeyBundle:
    """A user's public keys as the gateway publishes them: two COSE_Keys in deterministic encoding.

    Constructing one validates both keys (BundleError otherwise), so every KeyBundle is usable.
    """

    signing: bytes
    agreement: bytes

    def __post_init__(self) -> None:
        _parse_key(self.signing, CoseCurve.ED25519)
        _parse_key(self.agreement, CoseCurve.X25519)

    @classmethod
    def of(cls, signing_key: SigningKey, agreement_key: AgreementKey) -> KeyBundle:
        return cls(signing_key.public_cose_key(), agreement_key.public_cose_key())

    def encode(self) -> bytes:
        """CBOR map {0: signing COSE_Key, 1: agreement COSE_Key}, deterministic encoding."""
        return _dumps(
            {BundleKey.SIGNING.value: cbor2.loads(self.signing), BundleKey.AGREEMENT.value: cbor2.loads(self.agreement)}
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyBundle:
        """Strict inverse of :meth:`encode`; raises only BundleError."""
        value = _loads(data, BundleError, "key bundle")
        if not isinstance(value, Mapping) or any(type(k) is not int for k in value) or set(value) != set(BundleKey):
            raise BundleError("key bundle: map {0: signing COSE_Key, 1: agreement COSE_Key} expected")
        _key_fields(value[BundleKey.SIGNING], CoseCurve.ED25519)
        _key_fields(value[BundleKey.AGREEMENT], CoseCurve.X25519)
        bundle = cls(_dumps(value[BundleKey.SIGNING]), _dumps(value[BundleKey.AGREEMENT]))
        if bundle.encode() != bytes(data):
            raise BundleError("key bundle: not in deterministic encoding (RFC 8949 section 4.2.1)")
        return bundle


# --- Sign, then encrypt -----------------------------------------------------------------------------------


def seal_external_aad(recipient_agreement_cose_key: bytes) -> bytes:
    """The external_aad of a sealed message's inner signature: it names the intended recipient's key.

    A third party given the inner COSE_Sign1 checks it with
    ``verify(sign1, sender.signing, external_aad=seal_external_aad(recipient.agreement))``.
    """
    return cbor2.dumps([SEAL_LABEL, bytes(recipient_agreement_cose_key)])


def seal(
    plaintext: bytes,
    signing_key: SigningKey,
    agreement_key: AgreementKey,
    recipient_bundle: KeyBundle,
    *,
    nonce: bytes | None = None,
    urandom: Urandom = os.urandom,
) -> bytes:
    """COSE_Encrypt0 (to ``recipient_bundle``) whose plaintext is our COSE_Sign1 of ``plaintext``."""
    _check_plaintext(plaintext, "plaintext", MAX_SEALED_PLAINTEXT)
    inner = signing_key.sign(plaintext, external_aad=seal_external_aad(recipient_bundle.agreement))
    return agreement_key.encrypt_for(recipient_bundle.agreement, inner, nonce=nonce, urandom=urandom)


def open_sealed(data: bytes, sender_bundle: KeyBundle, agreement_key: AgreementKey) -> bytes:
    """The plaintext of a sealed message from ``sender_bundle`` to us; raises DecryptionError or VerificationError."""
    inner = agreement_key.decrypt_from(sender_bundle.agreement, data)
    return verify(inner, sender_bundle.signing, external_aad=seal_external_aad(agreement_key.public_cose_key()))


# --- Signed presence documents (RFC 2779 5.1.4, 5.3.1, 5.3.3) ---------------------------------------------

PRESENCE_SIGNATURE = "sig"  # the extension key that carries the signature


def _presence_aad(presentity: str, doc: Any) -> bytes:
    """What a presence signature covers: the presentity and every field its publisher
    sets (the gateway's timestamp, version and out-of-contact flag are not the
    publisher's word), without the signature itself."""
    from dataclasses import replace

    from .core import codec

    unsigned = replace(doc, extensions={k: v for k, v in doc.extensions.items() if k != PRESENCE_SIGNATURE})
    return _dumps(["impp-presence", presentity, codec.encode_presence(unsigned, for_publish=True)])


def sign_presence(doc: Any, presentity: str, key: SigningKey) -> Any:
    """``doc`` with a COSE_Sign1 (empty payload, the document as external AAD) in its
    extension ``sig``: the gateway keeps extensions verbatim, so watchers that see the
    whole document can check it came from the presentity's principal."""
    from dataclasses import replace

    signature = key.sign(b"", external_aad=_presence_aad(presentity, doc))
    return replace(doc, extensions={**doc.extensions, PRESENCE_SIGNATURE: signature})


def verify_presence(doc: Any, presentity: str, public_cose_key: bytes) -> None:
    """Raise VerificationError unless ``doc`` carries a valid signature of ``presentity``'s
    key over exactly these publisher fields (a filtered view cannot verify)."""
    signature = doc.extensions.get(PRESENCE_SIGNATURE)
    if not isinstance(signature, bytes):
        raise VerificationError("presence: no signature")
    if verify(signature, public_cose_key, external_aad=_presence_aad(presentity, doc)) != b"":
        raise VerificationError("presence: signature carries a payload")
