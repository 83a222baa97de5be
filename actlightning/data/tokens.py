"""Tokenize once, on disk, and select rows without holding the corpus in memory.

Tokenization is a ``datasets`` ``map`` over the whole loaded split: its result (``input_ids`` as
int32 lists and their ``length``) is an Arrow cache file next to the dataset's own, memory-mapped
and reused by every rank, rerun and resume. Its fingerprint is computed here from what decides the
tokens (the dataset's fingerprint, the input column and the tokenizer's full definition), so the
same split and tokenizer never tokenize twice. Selection steps then work on per-row arrays or on
the memory-mapped columns; what stays in RAM is a few numbers per selected row (see ``TokenTable``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actlightning.errors import ConfigError

log = logging.getLogger(__name__)

TOKENS, LENGTH = "input_ids", "length"
# Rows handed to the tokenizer at a time: the fast tokenizer batches in Rust; memory stays flat.
TOKENIZE_BATCH = 4096
# Rows per record batch of the token cache.
_CACHE_BATCH_ROWS = 65536
# Rows of text read into Python at a time by the selection steps.
_CHUNK_ROWS = 65536
# Bumped when the cached columns change meaning.
_CACHE_VERSION = "actlightning-tokens-1"


@dataclass
class TokenTable:
    """Selected sequences whose tokens stay in a memory-mapped Arrow column.

    ``ids`` holds the token lists of every loaded row; ``example_ids`` the loaded-row index of each
    selected sequence and ``lengths`` its token count after truncation (both int32 while they fit).
    Per selected row that is 8 bytes in RAM, whatever the sequence lengths.
    """

    ids: pa.ChunkedArray
    example_ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.example_ids)

    def select(self, positions: np.ndarray) -> TokenTable:
        """The sequences at ``positions``, in that order."""
        return TokenTable(self.ids, self.example_ids[positions], self.lengths[positions])

    def sequences(self, positions: np.ndarray) -> list[np.ndarray]:
        """The (truncated) tokens of ``positions``, read from the memory-mapped column."""
        taken = self.ids.take(pa.array(self.example_ids[positions], type=pa.int64())).combine_chunks()
        offsets = taken.offsets.to_numpy()
        values = taken.values.to_numpy(zero_copy_only=False)
        return [values[offsets[i] : offsets[i] + int(n)] for i, n in enumerate(self.lengths[positions])]

    def sequence(self, position: int) -> np.ndarray:
        return self.sequences(np.asarray([position]))[0]


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A digest of everything that decides a tokenizer's output (its full JSON definition for fast
    tokenizers: vocabulary, merges, normalizer, the template that adds BOS/EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        text = Hasher.hash(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _tokenize_batch(texts: list, tokenizer: Any) -> dict:
    encoded = tokenizer([t if t is not None else "" for t in texts], add_special_tokens=True)["input_ids"]
    return {TOKENS: encoded, LENGTH: [len(ids) for ids in encoded]}


def tokenize_dataset(dataset, input_column: str, tokenizer: object, num_proc: int | None = None):
    """``input_ids`` (int32 lists) and ``length`` of every row, cached on disk beside the dataset.

    A second call with the same dataset, column and tokenizer reads the cache (no tokenization).
    Several processes starting together (torchrun, SLURM) take a file lock: one tokenizes, the others
    then read its cache.
    """
    from datasets import Features, List, Value

    # upstream: datasets keeps a Dataset's fingerprint in a private attribute (no public accessor).
    fingerprint = getattr(dataset, "_fingerprint")  # noqa: B009
    key = hashlib.sha256(
        "|".join([_CACHE_VERSION, fingerprint, input_column, tokenizer_fingerprint(tokenizer)]).encode()
    ).hexdigest()[:16]
    features = Features({TOKENS: List(Value("int32")), LENGTH: Value("int32")})
    kwargs = dict(
        batched=True,
        batch_size=TOKENIZE_BATCH,
        # Few, large record batches: opening the memory-mapped cache touches every batch's header
        # (and the pages around it), so 1,000-row batches would map tens of bytes a row into memory.
        writer_batch_size=_CACHE_BATCH_ROWS,
        input_columns=[input_column],
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer},
        features=features,
        new_fingerprint=key,
        num_proc=num_proc,
        desc="Tokenizing (once; cached)",
    )
    cache_dir = Path(dataset.cache_files[0]["filename"]).parent if dataset.cache_files else None
    if cache_dir is None:
        return dataset.map(_tokenize_batch, **kwargs)
    if not os.access(cache_dir, os.W_OK):
        # A read-only dataset folder (a shared save_to_disk copy): the cache goes to datasets' own cache.
        import datasets.config

        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "actlightning-tokens"
        cache_dir.mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(cache_dir / f"tokens-{key}.arrow")
    from filelock import FileLock

    with FileLock(str(cache_dir / f".actlightning-tokens-{key}.lock")):
        return dataset.map(_tokenize_batch, **kwargs)


def token_lengths(tokenized) -> np.ndarray:
    """The ``length`` column of a tokenized split as int32, kept beside its cache file as ``.npy``.

    Reading the column from the memory-mapped cache maps its neighbouring token pages into the
    process too (tens of bytes a row of resident memory); the ``.npy`` copy costs 4 bytes a row.
    """
    if not tokenized.cache_files:
        return tokenized.data.column(LENGTH).to_numpy().astype(np.int32)
    cache = Path(tokenized.cache_files[0]["filename"])
    path = cache.with_name(f"{cache.stem}.lengths.npy")
    if path.exists():
        return np.load(path, mmap_mode="r")  # page cache, read once by the selection
    lengths = tokenized.data.column(LENGTH).to_numpy().astype(np.int32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, lengths)
    os.replace(tmp, path)
    return lengths


def token_column_of_pretokenized(dataset, input_column: str) -> tuple[pa.ChunkedArray, np.ndarray]:
    """A pre-tokenized input column (lists of token ids) and its lengths, without Python lists."""
    column = dataset.data.column(input_column)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    return column, lengths


def iter_values(column: pa.ChunkedArray, positions: np.ndarray) -> Iterator[tuple[np.ndarray, list]]:
    """``(positions chunk, Python values)`` of ``column`` at ``positions``, a bounded chunk at a time."""
    for start in range(0, len(positions), _CHUNK_ROWS):
        chunk = positions[start : start + _CHUNK_ROWS]
        yield chunk, column.take(pa.array(chunk, type=pa.int64())).to_pylist()


def _digest(value: object) -> bytes:
    if value is None:
        data = b"\x00"
    elif isinstance(value, str):
        data = b"s" + value.encode()
    else:
        data = b"t" + np.asarray(value, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=8).digest()


def dedupe_rows(column: pa.ChunkedArray, positions: np.ndarray) -> np.ndarray:
    """Positions (a subset of ``positions``, in order) holding the first occurrence of each value.

    Values are compared by a 64-bit digest (8 bytes per row in RAM; two different inputs collide
    with a probability of about n^2 / 2^65, below one in a million for a billion rows).
    """
    digests = np.empty(len(positions), dtype=np.uint64)
    done = 0
    for chunk, values in iter_values(column, positions):
        digests[done : done + len(chunk)] = np.frombuffer(b"".join(_digest(v) for v in values), dtype=np.uint64)
        done += len(chunk)
    _, first = np.unique(digests, return_index=True)
    return positions[np.sort(first)]


def drop_prefix_rows(column: pa.ChunkedArray, positions: np.ndarray) -> np.ndarray:
    """Positions (in order) whose value is not a strict prefix of another selected value.

    Text columns are sorted by Arrow (8 bytes of sort indices per row, plus Arrow's working memory)
    and walked in reverse sorted order a chunk at a time; see ``filters.drop_prefixes`` for why the
    next *different* value decides. Pre-tokenized columns fall back to ``filters.drop_prefixes`` on
    tuples held in memory.
    """
    from actlightning.data.filters import drop_prefixes

    selected = column.take(pa.array(positions, type=pa.int64()))
    if not (pa.types.is_string(selected.type) or pa.types.is_large_string(selected.type)):
        values = [tuple(v) if v is not None else () for v in selected.to_pylist()]
        return positions[drop_prefixes(values)]
    selected = pc.fill_null(selected, "")
    order = pc.sort_indices(selected).to_numpy()
    dropped = np.zeros(len(positions), dtype=bool)
    run_value = next_value = None
    first = True
    for stop in range(len(order), 0, -_CHUNK_ROWS):
        chunk = order[max(0, stop - _CHUNK_ROWS) : stop][::-1]
        values = selected.take(pa.array(chunk, type=pa.int64())).to_pylist()
        for position, value in zip(chunk, values, strict=True):
            if first or value != run_value:
                next_value = None if first else run_value
                run_value = value
                first = False
            if next_value is not None and len(next_value) > len(value) and next_value.startswith(value):
                dropped[position] = True
    return positions[~dropped]


def load_tokenizer(name: str | None, revision: str | None) -> Any:
    """The model's tokenizer (``data.tokenizer``, which the CLI links to ``model.checkpoint``)."""
    from transformers import AutoTokenizer

    from actlightning.pretrained import load_pretrained

    if name is None:
        raise ConfigError("data.tokenizer is unset; the CLI links it to model.checkpoint")
    return load_pretrained(AutoTokenizer.from_pretrained, "model.checkpoint (its tokenizer)", name, revision=revision)
