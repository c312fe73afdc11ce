"""mms_core.data.text and builtin://pystdlib: the standard library as a corpus, tokenisers, token
windows, and their way through ingest and shard with the ids intact."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from mms_core.data import text
from mms_core.data.ingest import DataSpec, load_source, snapshot
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard
from mms_core.errors import DataError

# ---------------------------------------------------------------- corpus


def test_corpus_is_the_sorted_stdlib_sources_without_third_party_packages():
    files = text.corpus_files()
    root = text.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]

    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not any(part in {"site-packages", "dist-packages"} for r in rel for part in r.split("/"))
    assert text.corpus_files(max_files=5) == files[:5]


def test_corpus_is_deterministic_and_capped():
    a = text.read_corpus(max_bytes=20_000)
    b = text.read_corpus(max_bytes=20_000)
    whole = b"".join(f.read_bytes() for f in text.corpus_files()[:40])

    assert a == b and len(a) == 20_000
    assert a == whole[:20_000]  # the files in order, cut at the cap
    two = text.read_corpus(max_files=2)
    assert two == b"".join(f.read_bytes() for f in text.corpus_files()[:2])


# ---------------------------------------------------------------- tokenisers


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return text.read_corpus(max_bytes=120_000)


def test_byte_tokenizer_round_trips_real_stdlib_text(corpus):
    tok = text.ByteTokenizer()
    ids = tok.encode(corpus)

    assert tok.vocab_size == 256 and len(ids) == len(corpus)
    assert ids.dtype == np.uint16 and int(ids.max()) < 256
    assert tok.decode(ids) == corpus
    assert tok.decode(tok.encode("naïve → ok")) == "naïve → ok".encode()


def test_bpe_round_trips_text_it_was_not_trained_on(corpus):
    tok = text.BpeTokenizer.train(data=corpus[:60_000], vocab_size=320)
    unseen = corpus[60_000:] + "ünïcode ✓ \x00\xff".encode()
    ids = tok.encode(unseen)

    assert tok.vocab_size == 320 and int(ids.max()) < 320
    assert tok.decode(ids) == unseen
    assert len(ids) < 0.8 * len(unseen)  # merges learned on code compress other code


def test_bpe_training_is_deterministic_and_merges_the_most_frequent_pair_first(corpus):
    data = corpus[:30_000]
    a = text.BpeTokenizer.train(data=data, vocab_size=300)
    b = text.BpeTokenizer.train(data=data, vocab_size=300)
    assert a.merges == b.merges and len(a.merges) == 44

    # By hand: adjacent byte pairs inside the pre-split chunks, most frequent first, ties -> smallest.
    pairs = Counter(p for chunk in text._CHUNK.findall(data) for p in zip(chunk, chunk[1:], strict=False))
    best = min(pairs, key=lambda p: (-pairs[p], p))
    assert a.merges[0] == best
    assert a.pieces[256] == bytes(best)


def test_token_windows_label_is_the_token_after_each_window():
    tokens = np.arange(23, dtype=np.uint16)
    x, y = text.token_windows(tokens=tokens, seq_len=5)

    assert x.shape == (4, 5)  # (23 - 1) // 5 rows: every label must exist
    assert x[1].tolist() == [5, 6, 7, 8, 9] and y.tolist() == [5, 10, 15, 20]
    assert (x[1:, 0] == y[:-1]).all()  # a label is the next row's first input


# ---------------------------------------------------------------- ingest + shard


def test_ingest_pystdlib_gives_token_windows_of_the_corpus():
    df = load_source(spec=DataSpec(source="builtin://pystdlib?seq_len=16&max_bytes=5000"))
    corpus = text.read_corpus(max_bytes=5000)

    assert list(df.columns) == [f"t_{i}" for i in range(16)] + ["label"]
    assert len(df) == (5000 - 1) // 16
    assert df.attrs[text.TOKEN_VOCAB_ATTR] == 256
    stream = df.drop(columns="label").to_numpy().ravel()
    assert bytes(stream.astype(np.uint8)) == corpus[: len(stream)]
    assert df["label"].tolist() == list(corpus[16 : len(df) * 16 + 1 : 16])


def test_ingest_pystdlib_with_bpe_decodes_back_to_the_corpus():
    df = load_source(
        spec=DataSpec(source="builtin://pystdlib?seq_len=8&max_bytes=20000&tokenizer=bpe&vocab_size=300")
    )
    assert df.attrs[text.TOKEN_VOCAB_ATTR] == 300
    assert int(df.drop(columns="label").to_numpy().max()) < 300


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("tokenizer=words", "unknown tokenizer 'words'"),
        ("vocab_size=512", "vocab_size applies to tokenizer=bpe only"),
        ("tokenizer=bpe&vocab_size=100", "vocab_size must be within 257..65536"),
        ("seq_len=64&max_bytes=300", "raise max_bytes or lower seq_len"),
        ("seq=64", r"unknown parameter\(s\) \['seq'\]"),
    ],
)
def test_ingest_pystdlib_rejects_bad_parameters_with_the_fix(query, match):
    with pytest.raises(DataError, match=match):
        load_source(spec=DataSpec(source=f"builtin://pystdlib?{query}"))


def test_shards_keep_token_ids_and_labels_unscaled_and_unmapped(tmp_path):
    spec = DataSpec(source="builtin://pystdlib?seq_len=16&max_bytes=8000")
    df = load_source(spec=spec)
    raw = snapshot(df=df, label="label", root=str(tmp_path))
    manifest = load_manifest(
        preprocess_and_shard(
            raw_uri=raw.uri,
            source_sha256=raw.sha256,
            label="label",
            spec=ShardSpec(n_shards=2),
            root=str(tmp_path),
        )
    )

    assert manifest.classes == list(range(256))  # the whole vocabulary, not the labels seen
    assert manifest.mean == [0.0] * 16 and manifest.std == [1.0] * 16
    rows = {tuple(r) for r in df.to_numpy().tolist()}
    seen = 0
    for info in [*manifest.train, manifest.val, manifest.test]:
        x, y = read_shard(info)
        assert (x == np.round(x)).all()
        for xi, yi in zip(x.astype(np.int64).tolist(), y.tolist(), strict=True):
            assert (*xi, yi) in rows  # the raw window and its next token, untouched
        seen += len(y)
    assert seen == len(df)


def test_token_ids_outside_the_vocabulary_are_a_data_error(tmp_path):
    df = pd.DataFrame({"t_0": [1, 2, 300], "t_1": [3, 4, 5], "label": [1, 2, 3]})
    df.attrs[text.TOKEN_VOCAB_ATTR] = 256
    raw = snapshot(df=df, label="label", root=str(tmp_path))
    with pytest.raises(DataError, match=r"token ids must lie in 0\.\.255"):
        preprocess_and_shard(
            raw_uri=raw.uri,
            source_sha256=raw.sha256,
            label="label",
            spec=ShardSpec(n_shards=1),
            root=str(tmp_path),
        )
