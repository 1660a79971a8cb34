"""Regenerate the corpus and retrain the dictionaries: ``python -m gateway.dictionaries.train``.

The corpus is synthetic but shaped like real traffic (what devices publish and send,
what the gateway serves back), generated from a fixed seed so the result is
reproducible byte for byte; replace it with captured traffic when there is some.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import cbor2
import zstandard

from ..core import codec
from ..core.ids import UserId
from ..core.model import Contact, ExtValue, InstantMessage, MessageId, PresenceDocument, QueuedMessage, Seq, Status
from . import DICTIONARY_IDS

HERE = Path(__file__).resolve().parent
DICT_SIZE = 1024  # bytes a device must hold per dictionary
SAMPLES = 3000
SEED = 2779

NOTES = [
    "at my desk",
    "in a meeting",
    "on the road",
    "available",
    "busy",
    "do not disturb",
    "back in 5 min",
    "out for lunch",
    "driving",
    "on a call",
    "working from home",
    "sleeping",
    "battery low",
    "charging",
    "offline soon",
    "in the lab",
    "at the gym",
    "travelling",
    "on holiday",
    "call me later",
    "idle",
    "im Büro",
    "en réunion",
    "en camino",
    "в дороге",
    "会議中",
    "disponible",
    "unterwegs",
]
WORDS = (
    "ok yes no thanks see you soon later today tomorrow meeting call me when you can I am on my way "
    "running late be there in minutes where are you the sensor battery is low door opened alarm "
    "temperature reading gate status please check update done sent received arrived home work "
    "bitte danke später morgen gracias hola merci bientôt спасибо"
).split()
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "sensor-17", "gate-3", "tracker-204", "meter-9"]
DOMAINS = ["example.org", "example.com", "iot.example.net"]


def _user(rng: random.Random) -> UserId:
    return UserId(f"{rng.choice(NAMES)}{rng.randrange(100) if rng.random() < 0.3 else ''}@{rng.choice(DOMAINS)}")


def _text(rng: random.Random, limit: int) -> str:
    words: list[str] = []
    while len(" ".join(words)) < rng.randrange(5, limit):
        words.append(rng.choice(WORDS))
    return " ".join(words)[:limit]


def presence_samples(rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(SAMPLES):
        contact = Contact(
            tel=f"+{rng.randrange(1, 99)} {rng.randrange(10**6, 10**9)}" if rng.random() < 0.3 else None,
            email=f"{rng.choice(NAMES)}@{rng.choice(DOMAINS)}" if rng.random() < 0.2 else None,
        )
        ext: dict[int | str, ExtValue] = {"battery": rng.randrange(101)} if rng.random() < 0.2 else {}
        doc = PresenceDocument(
            Status(rng.random() < 0.7),
            note=rng.choice(NOTES) if rng.random() < 0.8 else None,
            contact=contact,
            extensions=ext,
            lease=rng.choice([None, 60, 300, 600, 3600, 86400]),
            timestamp=1_790_000_000 + rng.randrange(10**7),
            version=rng.randrange(1, 5000),
            out_of_contact=rng.random() < 0.05,
        )
        out.append(codec.encode_presence(doc, for_publish=rng.random() < 0.5))
    return out


def im_samples(rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(SAMPLES):
        sender, recipient = _user(rng), _user(rng)
        msg = InstantMessage(
            MessageId(rng.randbytes(8)),
            sender,
            recipient,
            _text(rng, rng.choice([20, 40, 80, 140])).encode(),
            reply_to=sender if rng.random() < 0.1 else None,
            ttl=rng.choice([None, None, 3600, 86400]),
        )
        if rng.random() < 0.5:  # as POSTed over OSCORE: no "from"
            out.append(codec.encode_message(msg, include_from=False))
        else:  # as served in an inbox batch
            # (im-v1 was trained on batches in their explicit form, cursor and more included)
            out.append(codec.encode_batch([QueuedMessage(Seq(rng.randrange(1, 10**6)), msg, 0)], False, terse=False))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE, help="where to write corpus and dictionaries")
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    corpora = {"presence": presence_samples(rng), "im": im_samples(rng)}
    for (message_class, version), dict_id in DICTIONARY_IDS.items():
        samples = corpora[message_class]
        (out / f"corpus-{message_class}.cborseq").write_bytes(b"".join(cbor2.dumps(s) for s in samples))
        trained = zstandard.train_dictionary(
            DICT_SIZE, list[bytes | bytearray | memoryview](samples), level=19, threads=1, dict_id=dict_id
        )
        path = out / f"{message_class}-v{version}.zdict"
        path.write_bytes(trained.as_bytes())
        print(f"{path.name}: id {dict_id}, {len(trained.as_bytes())} bytes from {len(samples)} samples")


if __name__ == "__main__":
    main()
