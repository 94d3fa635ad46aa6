import hashlib
import math

import numpy as np
import pytest

from jaxllm import data


def test_encode_decode_round_trip_utf8():
    text = "def f(x):\n    return 'héllo → ∑'\n"
    ids = data.encode(text)
    assert ids.dtype == np.int32
    assert list(ids) == list(text.encode("utf-8"))
    assert data.decode(ids) == text


def test_decode_drops_eot_and_replaces_broken_bytes():
    ids = [*data.encode("ab"), data.EOT, 0xFF, *data.encode("c")]
    assert data.decode(ids) == "ab\ufffdc"
    with pytest.raises(ValueError, match="257"):
        data.decode([65, 257])
    assert data.VOCAB_SIZE == data.EOT + 1 == 257


def test_file_corpus_is_its_bytes_then_eot(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\n")
    assert list(data.load_corpus(path)) == [*b"hello\n", data.EOT]


def test_directory_corpus_is_sorted_documents_each_ending_in_eot(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"BB")
    (tmp_path / "sub" / "c.txt").write_bytes(b"C")
    (tmp_path / "a.txt").write_bytes(b"A")
    (tmp_path / ".hidden").write_bytes(b"H")
    (tmp_path / "empty.txt").write_bytes(b"")
    expected = [*b"A", data.EOT, *b"BB", data.EOT, *b"C", data.EOT]
    assert list(data.load_corpus(tmp_path)) == expected


def test_default_corpus_is_the_stdlib_top_level_sources():
    files = data.default_corpus_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert any(f.name == "os.py" for f in files)
    tokens = data.load_corpus()
    sizes = [f.stat().st_size for f in files]
    assert len(tokens) == sum(sizes) + sum(1 for s in sizes if s)
    assert int((tokens == data.EOT).sum()) == sum(1 for s in sizes if s)
    first = files[0].read_bytes()
    assert list(tokens[: len(first)]) == list(first)


def test_missing_or_empty_data_is_named(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_corpus(tmp_path / "nope.txt")
    with pytest.raises(data.DataError, match="/dev/null is neither a file nor a directory"):
        data.load_corpus("/dev/null")  # exists: a character device
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(data.DataError, match="no text"):
        data.load_corpus(tmp_path / "empty.txt")
    with pytest.raises(data.DataError, match="no text"):
        data.load_corpus(tmp_path)


def test_split_and_window_check():
    tokens = np.arange(100, dtype=np.int32)
    train, val = data.split(tokens, 0.1)
    assert len(train) == 90 and len(val) == 10
    assert list(np.concatenate([train, val])) == list(tokens)
    data.check_windows(val, 9, "validation")
    with pytest.raises(data.DataError, match=r"validation split has 10 tokens.*seq_len \+ 1 = 11"):
        data.check_windows(val, 10, "validation")
    with pytest.raises(data.DataError, match="val_fraction"):
        data.split(tokens, 1.0)


def test_train_batches_are_seeded_windows_of_the_stream():
    tokens = np.arange(1000, dtype=np.int32)  # a token's value is its offset
    batch = data.train_batch(tokens, step=3, batch_size=8, seq_len=16, seed=5)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    starts = batch[:, 0]
    np.testing.assert_array_equal(batch, starts[:, None] + np.arange(17))
    assert starts.max() <= 1000 - 17
    np.testing.assert_array_equal(batch, data.train_batch(tokens, 3, 8, 16, 5))
    assert not np.array_equal(batch, data.train_batch(tokens, 4, 8, 16, 5))
    assert not np.array_equal(batch, data.train_batch(tokens, 3, 8, 16, 6))


def test_a_stream_of_exactly_t_plus_one_tokens_gives_that_window():
    tokens = np.arange(17, dtype=np.int32)
    batch = data.train_batch(tokens, 0, 4, 16, 0)
    np.testing.assert_array_equal(batch, np.broadcast_to(tokens, (4, 17)))


def test_eval_batches_span_the_split_evenly():
    tokens = np.arange(500, dtype=np.int32)
    batches = data.eval_batches(tokens, 3, 4, 16)
    assert batches.shape == (3, 4, 17)
    starts = batches[:, :, 0].reshape(-1)
    assert starts[0] == 0 and batches[-1, -1, -1] == 499
    assert np.all(np.diff(starts) > 0)


def test_unigram_entropy_in_nats():
    assert data.unigram_entropy(np.array([1, 2, 3, 4] * 5)) == pytest.approx(math.log(4))
    assert data.unigram_entropy(np.array([7, 7, 7])) == 0.0
    p = np.array([0.75, 0.25])
    assert data.unigram_entropy(np.array([0, 0, 0, 1])) == pytest.approx(-(p * np.log(p)).sum())


def test_a_large_corpus_is_memory_mapped_and_reads_the_same(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"hello\n" * 1000)
    (tmp_path / "b.txt").write_bytes("wörld".encode() * 500)
    in_memory = data.load_corpus(tmp_path)
    monkeypatch.setattr(data, "MEMMAP_BYTES", 100)
    monkeypatch.setattr(data, "_CHUNK", 1000)  # several pieces per file
    mapped = data.load_corpus(tmp_path)
    assert isinstance(mapped, np.memmap) and not isinstance(in_memory, np.memmap)
    expected = [*b"hello\n" * 1000, data.EOT, *"wörld".encode() * 500, data.EOT]
    assert mapped.tolist() == in_memory.tolist() == expected
    # The fingerprint is still SHA-256 of the int32 stream (what earlier checkpoints recorded).
    truth = hashlib.sha256(np.array(expected, "<i4").tobytes()).hexdigest()
    assert data.fingerprint(mapped) == data.fingerprint(in_memory) == truth
    assert data.unigram_entropy(mapped) == pytest.approx(data.unigram_entropy(np.array(expected)))
    batch = data.train_batch(mapped, 3, 4, 16, 0)
    assert batch.dtype == np.int32
    np.testing.assert_array_equal(batch, data.train_batch(np.array(expected), 3, 4, 16, 0))
