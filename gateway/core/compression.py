"""Theory of operation: zstandard with trained dictionaries, as CoAP content formats.

Payloads are small (tens of bytes), where general compression gains nothing; a
dictionary trained on typical presence documents and messages gives the compressor
the shared vocabulary up front. Each dictionary has an id (1..255) and a message
class; the id travels in the content format: ``COMPRESSED_BASE + id`` (experimental
range, RFC 7252 12.3). Frames are zstd "magicless" (no 4-byte magic), without
content size, checksum or dictionary id: the content format already says which
dictionary, CBOR says where the data ends, and OSCORE (or the CoAP checksum-free
design) protects integrity.

A sender compresses only when the result is smaller; a receiver that lacks the
dictionary refuses the format (4.15 / 4.06) and the sender falls back to plain CBOR
(content format 60). Decompression is bounded to the largest body the gateway takes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import zstandard

from .errors import CodecError, UnsupportedContentFormat

CBOR_CONTENT_FORMAT = 60
COMPRESSED_BASE = 65200  # + dictionary id (1..255): content formats 65201..65455
LEVEL = 19


@dataclass(frozen=True)
class Dictionary:
    dict_id: int
    message_class: str  # "presence", "im", ...
    version: int
    data: bytes
    _compress: zstandard.ZstdCompressor = field(init=False, repr=False, compare=False)
    _decompress: zstandard.ZstdDecompressor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.dict_id <= 255:
            raise ValueError("dictionary id must be 1..255")
        zdict = zstandard.ZstdCompressionDict(self.data)
        params = zstandard.ZstdCompressionParameters.from_level(
            LEVEL,
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=False,
            write_checksum=False,
            write_dict_id=False,
        )
        object.__setattr__(self, "_compress", zstandard.ZstdCompressor(dict_data=zdict, compression_params=params))
        object.__setattr__(
            self,
            "_decompress",
            zstandard.ZstdDecompressor(dict_data=zdict, format=zstandard.FORMAT_ZSTD1_MAGICLESS),
        )

    @property
    def content_format(self) -> int:
        return COMPRESSED_BASE + self.dict_id

    def compress(self, data: bytes) -> bytes:
        return bytes(self._compress.compress(data))

    def decompress(self, data: bytes, limit: int) -> bytes:
        # No content size in the frame, and a few kilobytes of zstd can describe
        # megabytes: read through a stream with a hard output bound.
        try:
            with self._decompress.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
                out = reader.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise CodecError("malformed compressed body") from exc
        if len(out) > limit:
            raise CodecError(f"compressed body expands beyond {limit} bytes")
        if not out:  # zstd reads garbage and cut frames as "nothing yet"; a body is never empty
            raise CodecError("malformed compressed body")
        return bytes(out)


class DictionaryRegistry:
    def __init__(self, dictionaries: list[Dictionary] | None = None) -> None:
        self._by_id: dict[int, Dictionary] = {}
        for d in dictionaries or []:
            self.add(d)

    def add(self, dictionary: Dictionary) -> None:
        if dictionary.dict_id in self._by_id:
            raise ValueError(f"dictionary id {dictionary.dict_id} registered twice")
        self._by_id[dictionary.dict_id] = dictionary

    def __iter__(self) -> Iterator[Dictionary]:
        return iter(self._by_id.values())

    def for_content_format(self, content_format: int) -> Dictionary | None:
        return self._by_id.get(content_format - COMPRESSED_BASE) if is_compressed(content_format) else None

    def newest_for(self, message_class: str) -> Dictionary | None:
        candidates = [d for d in self._by_id.values() if d.message_class == message_class]
        return max(candidates, key=lambda d: d.version, default=None)

    def decode_body(self, payload: bytes, content_format: int | None, limit: int) -> bytes:
        """The CBOR inside a request body of any supported format."""
        if content_format is None or content_format == CBOR_CONTENT_FORMAT:
            return payload
        dictionary = self.for_content_format(content_format)
        if dictionary is None:
            raise UnsupportedContentFormat(
                f"content format {content_format} not supported: use 60 or a known dictionary"
            )
        return dictionary.decompress(payload, limit)

    def encode_body(self, cbor: bytes, accept: int | None) -> tuple[bytes, int]:
        """(payload, content format) for a response: compressed with the dictionary the
        client named in Accept, but only when that is smaller."""
        dictionary = self.for_content_format(accept) if accept is not None else None
        if dictionary is not None:
            packed = dictionary.compress(cbor)
            if len(packed) < len(cbor):
                return packed, dictionary.content_format
        return cbor, CBOR_CONTENT_FORMAT


def is_compressed(content_format: int) -> bool:
    return COMPRESSED_BASE < content_format <= COMPRESSED_BASE + 255


def acceptable(accept: int | None, registry: DictionaryRegistry) -> bool:
    """Accept 60, or a known dictionary's format (meaning "CBOR, or CBOR compressed with it")."""
    return accept is None or accept == CBOR_CONTENT_FORMAT or registry.for_content_format(accept) is not None
