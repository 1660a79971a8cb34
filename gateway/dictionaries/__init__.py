"""Trained zstd dictionaries shipped with the gateway, and how they were made.

``python -m gateway.dictionaries.train`` regenerates the corpus (seeded, so the same
bytes every time) and retrains every dictionary from it; both are committed.
Files: ``corpus-<class>.cborseq`` (a CBOR sequence of sample bodies) and
``<class>-v<version>.zdict`` with id ``DICTIONARY_IDS[(class, version)]``.
"""

from __future__ import annotations

from importlib import resources

from ..core.compression import Dictionary, DictionaryRegistry

# (message class, version) -> dictionary id carried in the content format. Never reuse
# an id for other contents: devices in the field may hold the old dictionary.
DICTIONARY_IDS = {("presence", 1): 1, ("im", 1): 2}


def load_registry() -> DictionaryRegistry:
    registry = DictionaryRegistry()
    folder = resources.files(__package__)
    for (message_class, version), dict_id in DICTIONARY_IDS.items():
        item = folder / f"{message_class}-v{version}.zdict"
        if item.is_file():
            registry.add(Dictionary(dict_id, message_class, version, item.read_bytes()))
    return registry
