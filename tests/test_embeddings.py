"""Token-embedding rows read from the GGUF (trimcpp.embeddings) against gguf's full dequantisation."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from trimcpp.embeddings import TokenEmbeddings
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
