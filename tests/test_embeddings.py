"""Token-embedding rows read from the GGUF (trimcpp.embeddings) against gguf's full dequantisation."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from trimcpp.embeddings import GGUFHeader, TokenEmbeddings
from trimcpp.testing import SHAPES, WEIGHT_TYPES, write_llm

# A one-layer tiny LLM is enough: only token_embd.weight is read.
SHAPE = dataclasses.replace(SHAPES["tiny"], n_layer=1)


@pytest.fixture(scope="module", params=sorted(WEIGHT_TYPES))
def table(request, tmp_path_factory):
    path = write_llm(tmp_path_factory.mktemp("embd") / f"llm-{request.param}.gguf", SHAPE, embd_type=request.param)
    return request.param, path


def full_table(path) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(SHAPE.n_vocab, SHAPE.n_embd)


def test_rows_match_full_dequantisation(table):
    name, path = table
    embeddings = TokenEmbeddings(path)
    assert embeddings.qtype == WEIGHT_TYPES[name]
    assert (embeddings.n_vocab, embeddings.n_embd) == (SHAPE.n_vocab, SHAPE.n_embd)
    ids = [5, 1999, 0, 5, SHAPE.n_vocab - 1, 700]  # repeats and both ends, in no order
    rows = embeddings.rows(ids)
    expected = full_table(path)[ids]
    assert rows.dtype == np.float32 and rows.shape == (len(ids), SHAPE.n_embd)
    assert np.array_equal(rows, expected)
    assert np.all(np.isfinite(rows)) and np.abs(rows).max() > 0


def test_empty_and_bad_ids(table):
    _, path = table
    embeddings = TokenEmbeddings(path)
    assert embeddings.rows([]).shape == (0, SHAPE.n_embd)
    with pytest.raises(ValueError, match="token ids"):
        embeddings.rows([SHAPE.n_vocab])
    with pytest.raises(ValueError, match="token ids"):
        embeddings.rows([-1])


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read GGUF"):
        TokenEmbeddings(path)


def test_the_table_is_found_without_parsing_the_vocabulary(table, monkeypatch):
    """A fresh handler's first request must not pay gguf.GGUFReader's parse of every metadata field
    (1 to 10 s for real vocabularies): the header is walked, arrays skipped by their lengths."""
    _, path = table
    expected = full_table(path)
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: pytest.fail("GGUFReader was used"))
    header = GGUFHeader.read(path)
    assert header.values["general.architecture"] == "llama"
    assert "tokenizer.ggml.tokens" not in header.values  # the vocabulary: skipped, not read
    assert header.tensors["token_embd.weight"][0] == (SHAPE.n_embd, SHAPE.n_vocab)
    assert np.array_equal(TokenEmbeddings(path).rows(range(SHAPE.n_vocab)), expected)


def test_vocabulary_is_in_the_file_skipped(table):
    """The control for the test above: the file does carry a string-array vocabulary."""
    _, path = table
    field = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.tokens")
    assert field is not None and len(field.data) == SHAPE.n_vocab


@pytest.mark.parametrize("keep_bytes", [3, 20, 400, "table"])
def test_truncated_gguf(table, tmp_path, keep_bytes):
    _, path = table
    data = open(path, "rb").read()
    if keep_bytes == "table":  # cut inside token_embd.weight
        header = GGUFHeader.read(path)
        keep_bytes = header.data_start + header.tensors["token_embd.weight"][2] + 10
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match="cannot read GGUF file|does not fit the file"):
        TokenEmbeddings(cut)


def _gguf(path, alignment: int, shape: tuple[int, ...]):
    """A hand-made GGUF v3: one uint32 key (general.alignment), token_embd.weight (F32) of `shape`."""
    import struct

    key, name = b"general.alignment", b"token_embd.weight"
    blob = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    blob += struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, alignment)  # 4: uint32
    blob += struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, 0, 0)
    path.write_bytes(blob + bytes(64 + 4 * int(np.prod(shape))))
    return path


@pytest.mark.parametrize("alignment, shape, says", [
    (0, (4, 8), "general.alignment must be a positive integer, got 0"),
    (32, (32,), "token_embd.weight must be 2-D"),
])
def test_malformed_headers_are_value_errors(tmp_path, alignment, shape, says):
    with pytest.raises(ValueError, match=says):
        TokenEmbeddings(_gguf(tmp_path / "bad.gguf", alignment, shape))


def test_hand_made_gguf_reads(tmp_path):
    """The control for the test above: the same file with sane values is a 4 x 8 table of zeros."""
    rows = TokenEmbeddings(_gguf(tmp_path / "good.gguf", 32, (4, 8))).rows([0, 7])
    assert rows.shape == (2, 4) and not rows.any()
