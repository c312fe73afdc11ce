"""A real text corpus that every machine already has: the Python standard library's own source
files, and the tokenisers that turn it into token ids for a language model.

The corpus is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (third-party
``site-packages`` excluded), in sorted order of their relative paths, concatenated as bytes and
cut at ``max_bytes``: the same Python build gives the same bytes on any machine, no download.

Tokenisers work on bytes, so any file round-trips exactly whatever its encoding:
- :class:`ByteTokenizer`: one token per byte (vocabulary 256).
- :class:`BpeTokenizer`: byte-pair encoding trained on the corpus itself (vocabulary 256 + merges).
  Training is deterministic: the most frequent pair wins, ties go to the smallest pair of ids.
"""

from __future__ import annotations

import heapq
import os
import re
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

TOKEN_VOCAB_ATTR = "mms_token_vocab"
"""Key in a table's ``attrs`` (kept in its Parquet metadata) marking its columns as token ids below
this vocabulary size: shard.py then neither scales nor remaps them."""
_THIRD_PARTY = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Pre-split before BPE so merges never cross a word boundary: words (with one leading space),
# numbers, runs of punctuation, and whitespace runs (indentation is a token of its own in code).
_CHUNK = re.compile(rb" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+")


def stdlib_root() -> Path:
    """Directory of this interpreter's standard library (the base install's, also from a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(*, root: Path | None = None, max_files: int | None = None) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by relative path, at most ``max_files``."""
    root = root or stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY]  # prune: never descend
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    found.sort()  # os.walk order depends on the filesystem; sorting makes the corpus reproducible
    return [root / f for f in found[:max_files]]


def read_corpus(
    *, root: Path | None = None, max_bytes: int | None = None, max_files: int | None = None
) -> bytes:
    """The corpus as bytes: the files of :func:`corpus_files` concatenated, cut at ``max_bytes``.

    Files are read only until the cap is reached, so a small cap is fast.
    """
    parts: list[bytes] = []
    total = 0
    for path in corpus_files(root=root, max_files=max_files):
        if max_bytes is not None and total >= max_bytes:
            break
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
    corpus = b"".join(parts)
    return corpus if max_bytes is None else corpus[:max_bytes]


class ByteTokenizer:
    """One token per byte: vocabulary 256, exact round trip, nothing to train."""

    vocab_size = 256

    def encode(self, data: bytes | str) -> np.ndarray:
        """Token ids (uint16) of ``data`` (text is encoded as UTF-8)."""
        raw = data.encode() if isinstance(data, str) else data
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray | list[int]) -> bytes:
        return np.asarray(ids, dtype=np.uint8).tobytes()


class BpeTokenizer:
    """Byte-level BPE: ids 0-255 are bytes, id ``256 + i`` is the ``i``-th learned merge."""

    def __init__(self, *, merges: list[tuple[int, int]]) -> None:
        self.merges = list(merges)
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.pieces = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self._cache: dict[bytes, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, *, data: bytes, vocab_size: int) -> BpeTokenizer:
        """Learn ``vocab_size - 256`` merges from ``data``; deterministic for the same bytes."""
        if vocab_size < 256 or vocab_size > 65536:
            raise ValueError(f"BPE vocab_size must be within 256..65536 (uint16 ids), got {vocab_size}")
        counts = Counter(_CHUNK.findall(data))
        words = [list(w) for w in counts]
        freq = list(counts.values())
        return cls(merges=_learn_merges(words, freq, n_merges=vocab_size - 256))

    def encode(self, data: bytes | str) -> np.ndarray:
        """Token ids (uint16) of ``data`` (text is encoded as UTF-8)."""
        raw = data.encode() if isinstance(data, str) else data
        ids: list[int] = []
        for chunk in _CHUNK.findall(raw):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._cache[chunk] = self._encode_chunk(chunk)
            ids += cached
        return np.asarray(ids, dtype=np.uint16)

    def decode(self, ids: np.ndarray | list[int]) -> bytes:
        return b"".join(self.pieces[int(i)] for i in ids)

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        word = list(chunk)
        while len(word) > 1:
            # Apply the earliest-learned merge present, as training did.
            rank, pair = min(
                (self.ranks.get(p, len(self.ranks)), p) for p in zip(word, word[1:], strict=False)
            )
            if rank == len(self.ranks):
                break
            word = _merge(word, pair, 256 + rank)
        return word


def _merge(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _learn_merges(words: list[list[int]], freq: list[int], *, n_merges: int) -> list[tuple[int, int]]:
    """Greedy BPE over unique words weighted by frequency; pair counts are updated only for the
    words a merge touches, and a heap with stale entries finds the next best pair."""
    stats: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, n) in enumerate(zip(words, freq, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            stats[pair] += n
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in stats.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if stats.get(pair, 0) != -neg or -neg < 2:
            continue  # stale entry (the count changed since it was pushed), or not worth a token
        new = 256 + len(merges)
        merges.append(pair)
        touched: set[tuple[int, int]] = set()
        for w in sorted(where.pop(pair)):
            old = words[w]
            for p in zip(old, old[1:], strict=False):
                stats[p] -= freq[w]
                touched.add(p)
            words[w] = _merge(old, pair, new)
            for p in zip(words[w], words[w][1:], strict=False):
                stats[p] += freq[w]
                where[p].add(w)
                touched.add(p)
        stats.pop(pair, None)
        for p in sorted(touched - {pair}):
            heapq.heappush(heap, (-stats[p], p))  # fresh entries; the old ones are now stale
    return merges


def token_windows(*, tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into rows of ``seq_len`` inputs and the one token that follows each.

    Rows do not overlap (stride ``seq_len``): row ``i`` holds ``tokens[i*L : (i+1)*L]`` and its
    label is ``tokens[(i+1)*L]``, which is also the first input of row ``i+1``. A causal LM reads a
    row's targets as its inputs shifted by one with the label appended, so every token of the
    stream (but the first) is a target exactly once.
    """
    rows = (len(tokens) - 1) // seq_len
    x = tokens[: rows * seq_len].reshape(rows, seq_len)
    y = tokens[seq_len : rows * seq_len + 1 : seq_len]
    return x, y
