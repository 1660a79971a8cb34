"""End-to-end COSE between devices (gateway/e2e.py): round trips, tampering, third parties, vectors, fuzz."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
import pytest
from aiocoap.numbers.contentformat import ContentFormat
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import e2e
from gateway.e2e import (
    AgreementKey,
    BundleError,
    DecryptionError,
    E2EError,
    KeyBundle,
    SigningKey,
    VerificationError,
    open_sealed,
    seal,
    seal_external_aad,
    verify,
)

TWENTY = b"on my way, 5 minutes"
assert len(TWENTY) == 20


def seeded(seed: int) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom."""
    return random.Random(seed).randbytes


@dataclass(frozen=True)
class Device:
    signing: SigningKey
    agreement: AgreementKey

    @property
    def bundle(self) -> KeyBundle:
        return KeyBundle.of(self.signing, self.agreement)


def device(seed: int) -> Device:
    rng = seeded(seed)
    return Device(SigningKey.generate(urandom=rng), AgreementKey.generate(urandom=rng))


ALICE, BOB, CAROL = device(1), device(2), device(3)


def flips(data: bytes) -> list[tuple[int, int, bytes]]:
    """Every single-bit variant of ``data``: (byte position, bit, mutated bytes)."""
    out = []
    for pos in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[pos] ^= 1 << bit
            out.append((pos, bit, bytes(mutated)))
    return out


# --- Round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", TWENTY, bytes(range(256)) * 8])
def test_sign_verify_round_trip(payload: bytes) -> None:
    assert verify(ALICE.signing.sign(payload), ALICE.bundle.signing) == payload


def test_external_aad_is_signed() -> None:
    signed = ALICE.signing.sign(TWENTY, external_aad=b"im-42")
    assert verify(signed, ALICE.bundle.signing, external_aad=b"im-42") == TWENTY
    with pytest.raises(VerificationError):
        verify(signed, ALICE.bundle.signing)


@pytest.mark.parametrize("payload", [b"", TWENTY, bytes(range(256)) * 8])
def test_encrypt_decrypt_round_trip_both_ways(payload: bytes) -> None:
    to_bob = ALICE.agreement.encrypt_for(BOB.bundle.agreement, payload)
    assert BOB.agreement.decrypt_from(ALICE.bundle.agreement, to_bob) == payload
    to_alice = BOB.agreement.encrypt_for(ALICE.bundle.agreement, payload)
    assert ALICE.agreement.decrypt_from(BOB.bundle.agreement, to_alice) == payload


def test_external_aad_is_bound_to_ciphertext() -> None:
    sealed = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, external_aad=b"im-42")
    assert BOB.agreement.decrypt_from(ALICE.bundle.agreement, sealed, external_aad=b"im-42") == TWENTY
    with pytest.raises(DecryptionError):
        BOB.agreement.decrypt_from(ALICE.bundle.agreement, sealed, external_aad=b"im-43")


def test_seal_open_round_trip() -> None:
    sealed = seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle)
    assert open_sealed(sealed, ALICE.bundle, BOB.agreement) == TWENTY


def test_keys_survive_private_bytes_round_trip() -> None:
    signing = SigningKey.from_private_bytes(ALICE.signing.private_bytes())
    agreement = AgreementKey.from_private_bytes(ALICE.agreement.private_bytes())
    assert KeyBundle.of(signing, agreement) == ALICE.bundle
    assert verify(signing.sign(TWENTY), ALICE.bundle.signing) == TWENTY
    assert BOB.agreement.decrypt_from(ALICE.bundle.agreement, agreement.encrypt_for(BOB.bundle.agreement, TWENTY))
    assert "private" not in repr(signing) and signing.private_bytes().hex() not in repr(signing)


# --- Tampering --------------------------------------------------------------------------------------------


def test_every_bit_flip_in_sign1_is_rejected() -> None:
    signed = ALICE.signing.sign(TWENTY)
    for pos, bit, mutated in flips(signed):
        with pytest.raises(VerificationError):
            verify(mutated, ALICE.bundle.signing)
            pytest.fail(f"accepted with byte {pos} bit {bit} flipped")


def test_every_bit_flip_in_encrypt0_is_rejected() -> None:
    sealed = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)
    for pos, bit, mutated in flips(sealed):
        with pytest.raises(DecryptionError):
            BOB.agreement.decrypt_from(ALICE.bundle.agreement, mutated)
            pytest.fail(f"accepted with byte {pos} bit {bit} flipped")


def test_every_bit_flip_in_sealed_message_is_rejected() -> None:
    sealed = seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle)
    for pos, bit, mutated in flips(sealed):
        with pytest.raises(E2EError):
            open_sealed(mutated, ALICE.bundle, BOB.agreement)
            pytest.fail(f"accepted with byte {pos} bit {bit} flipped")


def test_truncation_and_trailing_bytes_are_rejected() -> None:
    signed = ALICE.signing.sign(TWENTY)
    sealed = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)
    for cut in range(len(signed)):
        with pytest.raises(VerificationError):
            verify(signed[:cut], ALICE.bundle.signing)
    for cut in range(len(sealed)):
        with pytest.raises(DecryptionError):
            BOB.agreement.decrypt_from(ALICE.bundle.agreement, sealed[:cut])
    for junk in (b"\x00", b"\xf6", signed):
        with pytest.raises(VerificationError, match="trailing"):
            verify(signed + junk, ALICE.bundle.signing)
        with pytest.raises(DecryptionError, match="trailing"):
            BOB.agreement.decrypt_from(ALICE.bundle.agreement, sealed + junk)


def resign(key: SigningKey, protected: bytes, unprotected: dict[int, object], payload: bytes, tag: int = 18) -> bytes:
    """A COSE_Sign1 with arbitrary headers and a valid signature, to probe the profile checks."""
    signature = key._key.sign(e2e._sig_structure(protected, b"", payload))
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, unprotected, payload, signature]))


@pytest.mark.parametrize(
    ("protected", "unprotected", "tag", "reason"),
    [
        (bytes.fromhex("a10127"), {4: ALICE.signing.kid}, 18, None),  # the profile itself: accepted
        (bytes.fromhex("a10126"), {4: ALICE.signing.kid}, 18, "protected header"),  # alg ES256
        (bytes.fromhex("a201270300"), {4: ALICE.signing.kid}, 18, "protected header"),  # extra content type
        (b"", {1: -8, 4: ALICE.signing.kid}, 18, "protected header"),  # alg unprotected
        (bytes.fromhex("a10127"), {}, 18, "header labels"),  # no kid
        (bytes.fromhex("a10127"), {4: ALICE.signing.kid, 1: -8}, 18, "header labels"),  # alg twice
        (bytes.fromhex("a10127"), {4: ALICE.signing.kid}, 98, "CBOR tag 18"),  # COSE_Sign tag
        (bytes.fromhex("a10127"), {4: ALICE.signing.kid}, 17, "CBOR tag 18"),  # COSE_Mac0 tag
    ],
)
def test_sign1_profile_is_enforced(
    protected: bytes, unprotected: dict[int, object], tag: int, reason: str | None
) -> None:
    message = resign(ALICE.signing, protected, unprotected, TWENTY, tag)
    if reason is None:
        assert verify(message, ALICE.bundle.signing) == TWENTY
    else:
        with pytest.raises(VerificationError, match=reason):
            verify(message, ALICE.bundle.signing)


def test_only_the_deterministic_encoding_is_accepted() -> None:
    signed = ALICE.signing.sign(TWENTY)
    assert signed.startswith(bytes.fromhex("d28443a10127a10444"))
    longer_label = signed.replace(bytes.fromhex("a10444"), bytes.fromhex("a1180444"), 1)  # kid label as 0x18 0x04
    assert cbor2.loads(longer_label) == cbor2.loads(signed)
    with pytest.raises(VerificationError, match="deterministic"):
        verify(longer_label, ALICE.bundle.signing)
    encrypted = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)
    protected, unprotected, ciphertext = cbor2.loads(encrypted).value
    swapped = cbor2.dumps(cbor2.CBORTag(16, [protected, {5: unprotected[5], 4: unprotected[4]}, ciphertext]))
    with pytest.raises(DecryptionError, match="deterministic"):
        BOB.agreement.decrypt_from(ALICE.bundle.agreement, swapped)


def test_untagged_and_detached_sign1_are_rejected() -> None:
    item = cbor2.loads(ALICE.signing.sign(TWENTY))
    with pytest.raises(VerificationError, match="CBOR tag 18"):
        verify(cbor2.dumps(list(item.value)), ALICE.bundle.signing)
    detached = list(item.value)
    detached[2] = None
    with pytest.raises(VerificationError, match="payload"):
        verify(cbor2.dumps(cbor2.CBORTag(18, detached)), ALICE.bundle.signing)


# --- Wrong keys and third parties -------------------------------------------------------------------------


def test_wrong_key_is_rejected() -> None:
    with pytest.raises(VerificationError):
        verify(ALICE.signing.sign(TWENTY), BOB.bundle.signing)
    to_bob = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)
    with pytest.raises(DecryptionError):
        BOB.agreement.decrypt_from(CAROL.bundle.agreement, to_bob)  # wrong sender
    with pytest.raises(DecryptionError):
        CAROL.agreement.decrypt_from(ALICE.bundle.agreement, to_bob)  # wrong recipient
    with pytest.raises(VerificationError):
        verify(ALICE.signing.sign(TWENTY), ALICE.bundle.agreement)  # an X25519 key is no signer key
    with pytest.raises(DecryptionError):
        BOB.agreement.decrypt_from(ALICE.bundle.signing, to_bob)


def test_third_party_cannot_read_alice_to_bob() -> None:
    to_bob = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)
    assert TWENTY not in to_bob
    with pytest.raises(DecryptionError):
        CAROL.agreement.decrypt_from(ALICE.bundle.agreement, to_bob)
    # Carol claiming Bob's kid for her own key gets her nowhere: the key is what counts.
    carol_as_bob = AgreementKey.from_private_bytes(CAROL.agreement.private_bytes(), kid=BOB.agreement.kid)
    with pytest.raises(DecryptionError):
        carol_as_bob.decrypt_from(ALICE.bundle.agreement, to_bob)
    sealed = seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle)
    with pytest.raises(DecryptionError):
        open_sealed(sealed, ALICE.bundle, CAROL.agreement)


def test_third_party_cannot_forge_alice() -> None:
    carol_as_alice = SigningKey.from_private_bytes(CAROL.signing.private_bytes(), kid=ALICE.signing.kid)
    with pytest.raises(VerificationError, match="bad signature"):
        verify(carol_as_alice.sign(TWENTY), ALICE.bundle.signing)
    carol_agreement_as_alice = AgreementKey.from_private_bytes(CAROL.agreement.private_bytes(), kid=ALICE.agreement.kid)
    forged = carol_agreement_as_alice.encrypt_for(BOB.bundle.agreement, TWENTY)
    with pytest.raises(DecryptionError):
        BOB.agreement.decrypt_from(ALICE.bundle.agreement, forged)
    forged_seal = seal(TWENTY, carol_as_alice, carol_agreement_as_alice, BOB.bundle)
    with pytest.raises(DecryptionError):
        open_sealed(forged_seal, ALICE.bundle, BOB.agreement)
    # Carol's own seal, presented as Alice's: outer layer fails first.
    with pytest.raises(DecryptionError):
        open_sealed(seal(TWENTY, CAROL.signing, CAROL.agreement, BOB.bundle), ALICE.bundle, BOB.agreement)


def test_verification_checks_the_kid() -> None:
    # Same private key, different kid: the signature is valid, the kid is not the signer key's.
    same_key_other_kid = SigningKey.from_private_bytes(ALICE.signing.private_bytes(), kid=b"\x01")
    message = same_key_other_kid.sign(TWENTY)
    assert verify(message, same_key_other_kid.public_cose_key()) == TWENTY
    with pytest.raises(VerificationError, match="kid"):
        verify(message, ALICE.bundle.signing)
    with pytest.raises(VerificationError, match="kid"):
        verify(ALICE.signing.sign(TWENTY), same_key_other_kid.public_cose_key())


def test_decryption_checks_the_kid() -> None:
    same_key_other_kid = AgreementKey.from_private_bytes(ALICE.agreement.private_bytes(), kid=b"\x01")
    message = same_key_other_kid.encrypt_for(BOB.bundle.agreement, TWENTY)
    assert BOB.agreement.decrypt_from(same_key_other_kid.public_cose_key(), message) == TWENTY
    with pytest.raises(DecryptionError, match="kid"):
        BOB.agreement.decrypt_from(ALICE.bundle.agreement, message)


def test_messages_cannot_be_reflected_to_their_sender() -> None:
    # Even with colliding kids the two directions use different keys (PartyU/PartyV order and public keys).
    alice = AgreementKey.from_private_bytes(ALICE.agreement.private_bytes(), kid=b"\x07")
    bob = AgreementKey.from_private_bytes(BOB.agreement.private_bytes(), kid=b"\x07")
    to_bob = alice.encrypt_for(bob.public_cose_key(), TWENTY)
    assert bob.decrypt_from(alice.public_cose_key(), to_bob) == TWENTY
    with pytest.raises(DecryptionError):
        alice.decrypt_from(bob.public_cose_key(), to_bob)


def test_signed_sealed_message_cannot_be_forwarded_as_if_to_someone_else() -> None:
    """RFC 2779 appendix E1: Bob can prove what Alice sent him, but not that she sent it to Carol."""
    sealed = seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle)
    inner = BOB.agreement.decrypt_from(ALICE.bundle.agreement, sealed)
    # Evidence for a judge: Alice's signature over the message and Bob's key.
    assert verify(inner, ALICE.bundle.signing, external_aad=seal_external_aad(BOB.bundle.agreement)) == TWENTY
    # Bob re-encrypts Alice's signed message to Carol, keeping Alice's kid on the outside.
    bob_as_alice = AgreementKey.from_private_bytes(BOB.agreement.private_bytes(), kid=ALICE.agreement.kid)
    forwarded = bob_as_alice.encrypt_for(CAROL.bundle.agreement, inner)
    with pytest.raises(DecryptionError):
        open_sealed(forwarded, ALICE.bundle, CAROL.agreement)
    # Even if Bob could make the outer layer pass, the inner signature names Bob's key, not Carol's.
    with pytest.raises(VerificationError):
        verify(inner, ALICE.bundle.signing, external_aad=seal_external_aad(CAROL.bundle.agreement))


def test_low_order_peer_keys_are_refused() -> None:
    zero = cbor2.dumps({1: 1, 2: b"\x01", -1: 4, -2: bytes(32)}, canonical=True)
    with pytest.raises(BundleError, match="low-order"):
        ALICE.agreement.encrypt_for(zero, TWENTY)
    protected, unprotected, ciphertext = cbor2.loads(ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)).value
    spoofed = cbor2.CBORTag(16, [protected, {4: b"\x01", 5: unprotected[5]}, ciphertext])
    with pytest.raises(DecryptionError, match="low-order"):
        BOB.agreement.decrypt_from(zero, cbor2.dumps(spoofed))


# --- Nonces, determinism, arguments -----------------------------------------------------------------------


def test_fixed_nonce_is_deterministic() -> None:
    nonce = bytes(range(13))
    first = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, nonce=nonce)
    assert first == ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, nonce=nonce)
    assert first != ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, nonce=bytes(13))
    assert cbor2.loads(first).value[1] == {4: ALICE.agreement.kid, 5: nonce}
    assert seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle, nonce=nonce) == seal(
        TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle, nonce=nonce
    )
    assert ALICE.signing.sign(TWENTY) == ALICE.signing.sign(TWENTY)  # Ed25519 is deterministic


def test_nonce_comes_from_the_urandom_argument_and_differs_per_message() -> None:
    asked: list[int] = []

    def urandom(size: int) -> bytes:
        asked.append(size)
        return bytes([len(asked)]) * size

    one = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, urandom=urandom)
    two = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, urandom=urandom)
    assert asked == [13, 13]
    assert cbor2.loads(one).value[1][5] == b"\x01" * 13 and cbor2.loads(two).value[1][5] == b"\x02" * 13
    assert ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY) != ALICE.agreement.encrypt_for(
        BOB.bundle.agreement, TWENTY
    )
    assert device(9).bundle == device(9).bundle != device(10).bundle


def test_caller_errors() -> None:
    with pytest.raises(ValueError, match="nonce"):
        ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, nonce=bytes(12))
    with pytest.raises(ValueError, match="urandom"):
        ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, urandom=lambda n: bytes(n - 1))
    assert ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, sender_kid=ALICE.agreement.kid)
    with pytest.raises(ValueError, match="sender_kid"):
        ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, sender_kid=b"\x01")
    with pytest.raises(BundleError):
        ALICE.agreement.encrypt_for(b"\xa0", TWENTY)
    with pytest.raises(ValueError, match="kid"):
        SigningKey.generate(kid=b"")
    with pytest.raises(ValueError, match="kid"):
        AgreementKey.generate(kid=bytes(17))
    with pytest.raises(ValueError):
        SigningKey.from_private_bytes(bytes(31))
    with pytest.raises(ValueError, match="over"):
        ALICE.signing.sign(bytes(e2e.MAX_PLAINTEXT + 1))
    with pytest.raises(ValueError, match="over"):
        seal(bytes(e2e.MAX_SEALED_PLAINTEXT + 1), ALICE.signing, ALICE.agreement, BOB.bundle)
    biggest = seal(bytes(e2e.MAX_SEALED_PLAINTEXT), ALICE.signing, ALICE.agreement, BOB.bundle)
    assert open_sealed(biggest, ALICE.bundle, BOB.agreement) == bytes(e2e.MAX_SEALED_PLAINTEXT)


# --- Sizes ------------------------------------------------------------------------------------------------


def test_overhead_on_a_20_byte_payload() -> None:
    """Bytes added to a 20-byte IM: 80 signed, 38 encrypted, 118 both (4-byte kids; 1-byte kids save 3 each)."""
    assert len(ALICE.signing.sign(TWENTY)) - 20 == 80
    assert len(ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)) - 20 == 38
    assert len(seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle)) - 20 == 118
    short = Device(
        SigningKey.from_private_bytes(ALICE.signing.private_bytes(), kid=b"\x01"),
        AgreementKey.from_private_bytes(ALICE.agreement.private_bytes(), kid=b"\x01"),
    )
    assert len(short.signing.sign(TWENTY)) - 20 == 77
    assert len(short.agreement.encrypt_for(BOB.bundle.agreement, TWENTY)) - 20 == 35
    assert len(ALICE.bundle.signing) == len(ALICE.bundle.agreement) == 46
    assert len(ALICE.bundle.encode()) == 95


def test_content_formats_match_the_iana_registry() -> None:
    assert ContentFormat(e2e.CONTENT_FORMAT_COSE_SIGN1).media_type == 'application/cose; cose-type="cose-sign1"'
    assert ContentFormat(e2e.CONTENT_FORMAT_COSE_ENCRYPT0).media_type == 'application/cose; cose-type="cose-encrypt0"'


# --- Independent vectors ----------------------------------------------------------------------------------

RFC8032_TEST1_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_TEST1_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC7748_ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")  # section 6.1
RFC7748_BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
CONTENT = b"This is the content."
IV = bytes.fromhex("89f52f65a1c580933b5261a72f")

# Made by python-cwt 3.3.0 (an independent COSE implementation) from the keys above, in a separate venv: cwt 3
# needs cbor2 < 6, so it cannot be installed beside this project. Sign1: COSE.encode_and_sign with protected
# {1: -8}, unprotected {4: kid}. CEK: cwt's ECDH-SS + HKDF-256 recipient (alg -27) given PartyU identity/nonce/
# other (-21/-22/-23) = Alice's kid, IV, x; PartyV identity/other (-24/-26) = Bob's kid, x; and the context
# [10, ..., [128, h'a1010a', 'impp-e2e']]. Encrypt0: COSE.encode_and_encrypt under that CEK with {4: kid, 5: IV}.
CWT_SIGN1 = bytes.fromhex(
    "d28443a10127a10444866eefbd54546869732069732074686520636f6e74656e742e58406354488f9f290e36cd80e23762e664a5"
    "cb03e4267c66a8cffaef7c66d89a40bf2cbb8222432a08e5ee410d8b540c6931d26fb6af673f7e2100655d8bae765c04"
)
CWT_KDF_CONTEXT = bytes.fromhex(
    "840a8344d53b6f894d89f52f65a1c580933b5261a72f58208520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98e"
    "aa9b4e6a8344dee0d706f65820de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f83188043a1010a"
    "48696d70702d653265"
)
CWT_CEK = bytes.fromhex("c5270ca4f11386a820024ed4e457478d")
CWT_ENCRYPT0 = bytes.fromhex(
    "d08343a1010aa20444d53b6f89054d89f52f65a1c580933b5261a72f581cecca3a7c4735201bee45d490e5a6bc99b02872f4883b"
    "c07f1e7e2341"
)


def test_rfc8032_and_rfc7748_keys() -> None:
    signer = SigningKey.from_private_bytes(RFC8032_TEST1_SECRET)
    assert signer.public_bytes() == RFC8032_TEST1_PUBLIC
    assert signer.private_bytes() == RFC8032_TEST1_SECRET
    alice, bob = AgreementKey.from_private_bytes(RFC7748_ALICE), AgreementKey.from_private_bytes(RFC7748_BOB)
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert alice._shared(bob.public_bytes()) == bob._shared(alice.public_bytes()) == shared
    # Default kids are the first 4 bytes of the RFC 9679 thumbprint.
    assert signer.kid == bytes.fromhex("866eefbd")
    assert (alice.kid, bob.kid) == (bytes.fromhex("d53b6f89"), bytes.fromhex("dee0d706"))


def test_interop_with_cwt_sign1() -> None:
    signer = SigningKey.from_private_bytes(RFC8032_TEST1_SECRET)
    assert verify(CWT_SIGN1, signer.public_cose_key()) == CONTENT
    assert signer.sign(CONTENT) == CWT_SIGN1


def test_interop_with_cwt_ecdh_ss_encrypt0() -> None:
    alice, bob = AgreementKey.from_private_bytes(RFC7748_ALICE), AgreementKey.from_private_bytes(RFC7748_BOB)
    assert bob.decrypt_from(alice.public_cose_key(), CWT_ENCRYPT0) == CONTENT
    assert alice.encrypt_for(bob.public_cose_key(), CONTENT, nonce=IV) == CWT_ENCRYPT0
    cek = e2e._derive_cek(
        alice._shared(bob.public_bytes()), (alice.kid, alice.public_bytes()), (bob.kid, bob.public_bytes()), IV
    )
    assert cek == CWT_CEK
    assert cbor2.loads(CWT_KDF_CONTEXT) == [
        10,
        [alice.kid, IV, alice.public_bytes()],
        [bob.kid, None, bob.public_bytes()],
        [128, bytes.fromhex("a1010a"), b"impp-e2e"],
    ]


def test_cose_wg_example_eddsa_sig_01() -> None:
    """cose-wg/Examples eddsa-examples/eddsa-sig-01.json: Ed25519 COSE_Sign1 (key "11" is RFC 8032 test 1)."""
    vector = bytes.fromhex(
        "D28445A201270300A10442313154546869732069732074686520636F6E74656E742E58407142FD2FF96D56DB85BEE905A76BA1D0"
        "B7321A95C8C4D3607C5781932B7AFB8711497DFA751BF40B58B3BCC32300B1487F3DB34085EEF013BF08F4A44D6FEF0D"
    )
    protected, _, payload, signature = cbor2.loads(vector).value
    signer = SigningKey.from_private_bytes(RFC8032_TEST1_SECRET, kid=b"11")
    assert signer._key.sign(e2e._sig_structure(protected, b"", payload)) == signature  # our Sig_structure
    # A valid COSE_Sign1, but its protected header carries a content type: outside this profile.
    with pytest.raises(VerificationError, match="protected header"):
        verify(vector, signer.public_cose_key())


def test_cose_wg_example_aes_ccm_enc_01() -> None:
    """cose-wg/Examples aes-ccm-examples/aes-ccm-enc-01.json: COSE_Encrypt0, AES-CCM-16-64-128, given key.

    The RFC 8152 version (context "Encrypt0"; early drafts said "Encrypt1" and had another tag).
    """
    vector = bytes.fromhex(
        "D08343A1010AA1054D89F52F65A1C580933B5261A72F581C6899DA0A132BD2D2B9B10915743EE1F7B92A4680E7C51BDBC1B320EA"
    )
    cek = bytes.fromhex("849B57219DAE48DE646D07DBB533566E")
    assert e2e._encrypt0(cek, {5: IV}, CONTENT) == vector
    aad = e2e._enc_structure(bytes.fromhex("a1010a"), b"")
    assert AESCCM(cek, tag_length=8).decrypt(IV, cbor2.loads(vector).value[2], aad) == CONTENT
    assert e2e._enc_structure(bytes.fromhex("a1010a"), b"") == bytes.fromhex("8368456E63727970743043A1010A40")


# --- Bundles ----------------------------------------------------------------------------------------------


def test_bundle_round_trip() -> None:
    encoded = ALICE.bundle.encode()
    assert KeyBundle.decode(encoded) == ALICE.bundle
    assert cbor2.loads(encoded) == {0: cbor2.loads(ALICE.bundle.signing), 1: cbor2.loads(ALICE.bundle.agreement)}
    assert cbor2.loads(ALICE.bundle.signing) == {1: 1, 2: ALICE.signing.kid, -1: 6, -2: ALICE.signing.public_bytes()}


def bundle_with(signing: dict[int, object] | None = None, agreement: dict[int, object] | None = None) -> bytes:
    """Alice's bundle with some COSE_Key parameters changed (None deletes one), in deterministic encoding."""
    keys = [cbor2.loads(ALICE.bundle.signing), cbor2.loads(ALICE.bundle.agreement)]
    for key, changes in zip(keys, (signing or {}, agreement or {}), strict=True):
        for label, value in changes.items():
            if value is None:
                del key[label]
            else:
                key[label] = value
    return cbor2.dumps({0: keys[0], 1: keys[1]}, canonical=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xa0",
        cbor2.dumps([ALICE.bundle.signing, ALICE.bundle.agreement]),
        cbor2.dumps({0: cbor2.loads(ALICE.bundle.signing)}),
        cbor2.dumps({0: cbor2.loads(ALICE.bundle.agreement), 1: cbor2.loads(ALICE.bundle.signing)}),  # swapped
        cbor2.dumps({0: ALICE.bundle.signing, 1: ALICE.bundle.agreement}),  # bstr-wrapped keys
        cbor2.dumps({**cbor2.loads(bundle_with()), 2: 0}, canonical=True),
        bundle_with(signing={1: 2}),  # kty EC2
        bundle_with(signing={-1: 4}),  # Ed25519 key said to be X25519
        bundle_with(agreement={-2: bytes(31)}),
        bundle_with(signing={2: None}),  # no kid
        bundle_with(signing={2: b""}),
        bundle_with(signing={2: bytes(17)}),
        bundle_with(signing={2: "kid"}),
        bundle_with(signing={-4: bytes(32)}),  # a private key published
        bundle_with(signing={3: -7}),  # alg ES256 on an Ed25519 key
        bundle_with(signing={1: True}),
        bundle_with(agreement={1: 1.0}),
        bundle_with()[:-1],
        ALICE.bundle.encode() + b"\x00",
        cbor2.dumps({1: cbor2.loads(ALICE.bundle.agreement), 0: cbor2.loads(ALICE.bundle.signing)}),  # map order
        cbor2.dumps({0: {-2: ALICE.signing.public_bytes(), -1: 6, 2: ALICE.signing.kid, 1: 1}, 1: {}}),
        cbor2.dumps(  # a signing key out of deterministic order
            {0: {-2: ALICE.signing.public_bytes(), -1: 6, 2: ALICE.signing.kid, 1: 1}}
            | {1: cbor2.loads(ALICE.bundle.agreement)}
        ),
    ],
)
def test_bundle_decode_is_strict(data: bytes) -> None:
    with pytest.raises(BundleError):
        KeyBundle.decode(data)


def test_bundle_accepts_an_alg_that_matches() -> None:
    with_alg = bundle_with(signing={3: -8})
    assert cbor2.loads(KeyBundle.decode(with_alg).signing)[3] == -8
    with pytest.raises(BundleError):
        KeyBundle(b"garbage", ALICE.bundle.agreement)
    with pytest.raises(BundleError):
        KeyBundle(ALICE.bundle.agreement, ALICE.bundle.signing)


# --- Fuzz -------------------------------------------------------------------------------------------------

SEALED = seal(TWENTY, ALICE.signing, ALICE.agreement, BOB.bundle, nonce=bytes(13))
SIGNED = ALICE.signing.sign(TWENTY)
ENCRYPTED = ALICE.agreement.encrypt_for(BOB.bundle.agreement, TWENTY, nonce=bytes(13))

cbor_leaves = st.one_of(
    st.integers(-(2**64), 2**64),
    st.binary(max_size=40),
    st.text(max_size=10),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.sampled_from([ALICE.signing.kid, ALICE.agreement.kid, bytes(13), b"\xa1\x01\x27", b"\xa1\x01\x0a", bytes(64)]),
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.integers(-30, 30), st.text(max_size=3)), children, max_size=5),
        st.builds(cbor2.CBORTag, st.sampled_from([16, 18, 24, 96, 98]), children),
    ),
    max_leaves=20,
)


def only_module_errors(data: bytes) -> None:
    try:
        verify(data, ALICE.bundle.signing)
    except VerificationError:
        pass
    try:
        BOB.agreement.decrypt_from(ALICE.bundle.agreement, data)
    except DecryptionError:
        pass
    try:
        open_sealed(data, ALICE.bundle, BOB.agreement)
    except (DecryptionError, VerificationError):
        pass
    try:
        KeyBundle.decode(data)
    except BundleError:
        pass
    try:
        verify(SIGNED, data)
    except VerificationError:
        pass
    try:
        BOB.agreement.decrypt_from(data, ENCRYPTED)
    except DecryptionError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_module_errors(data: bytes) -> None:
    only_module_errors(data)


@settings(max_examples=300, deadline=None)
@given(cbor_values, st.sampled_from([16, 18, None]))
def test_random_cbor_raises_only_module_errors(value: object, tag: int | None) -> None:
    only_module_errors(cbor2.dumps(value if tag is None else cbor2.CBORTag(tag, value)))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([SIGNED, ENCRYPTED, SEALED, ALICE.bundle.encode()]),
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
        min_size=1,
        max_size=4,
    ),
)
def test_edited_messages_never_yield_other_content(original: bytes, edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(original)
    for pos, byte, op in edits:
        pos %= len(data) + 1
        if op == "insert":
            data.insert(pos, byte)
        elif pos < len(data):
            if op == "set":
                data[pos] = byte
            else:
                del data[pos]
    data_bytes = bytes(data)
    only_module_errors(data_bytes)
    # Nothing but the untouched original is ever accepted (not even a re-encoding of it).
    openers: list[Callable[[bytes], bytes]] = [
        lambda d: verify(d, ALICE.bundle.signing),
        lambda d: BOB.agreement.decrypt_from(ALICE.bundle.agreement, d),
        lambda d: open_sealed(d, ALICE.bundle, BOB.agreement),
    ]
    for opener in openers:
        try:
            opener(data_bytes)
        except E2EError:
            continue
        assert data_bytes == original
