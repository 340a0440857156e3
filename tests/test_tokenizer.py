"""Tokenizer: ids equal transformers.EsmTokenizer's; normalisation and error rules."""

import lzma
from pathlib import Path

import numpy as np
import pytest

from plmrun import tokenizer as tok

CORPUS = Path(__file__).resolve().parents[1] / "plmrun" / "corpus" / "swissprot2014_small"


def corpus_sequences(n):
    seqs, cur = [], []
    with lzma.open(CORPUS / "valid.fasta.xz", "rt") as f:
        for line in f:
            if line.startswith(">"):
                if cur:
                    seqs.append("".join(cur))
                    if len(seqs) == n:
                        break
                cur = []
            else:
                cur.append(line.strip())
    return seqs


@pytest.fixture(scope="module")
def esm_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path_factory.mktemp("esm") / "vocab.txt"
    vocab.write_text("\n".join(tok.VOCAB) + "\n")
    return transformers.EsmTokenizer(vocab_file=str(vocab))


def test_vocabulary_layout():
    assert tok.VOCAB_SIZE == 33 and len(tok.VOCAB) == 33
    assert (tok.CLS, tok.PAD, tok.EOS, tok.UNK, tok.MASK) == (0, 1, 2, 3, 32)
    assert [tok.VOCAB[i] for i in tok.AMINO_ACID_IDS] == list("LAGVSERTIDPKQNFYMHWC")
    assert "".join(tok.VOCAB[i] for i in tok.RESIDUE_IDS) == "LAGVSERTIDPKQNFYMHWCXBUZO.-"
    assert len(tok.VOCAB_HASH) == 16


def test_ids_equal_esm_tokenizer_on_corpus(esm_tokenizer):
    seqs = corpus_sequences(1400)
    seqs += ["XBUZO", "A", "LAGV.-", "O" * 50, "".join(tok.VOCAB[i] for i in tok.RESIDUE_IDS)]
    for s in seqs:
        ref = esm_tokenizer(s, add_special_tokens=True)["input_ids"]
        assert tok.with_specials(tok.encode(s)).tolist() == ref, s[:30]
        assert tok.decode(tok.encode(s)) == s
    assert esm_tokenizer.convert_tokens_to_ids("<mask>") == tok.MASK


def test_normalisation():
    assert tok.encode("mkV*").tolist() == tok.encode("MKV").tolist()
    assert tok.encode(b"MKV").tolist() == tok.encode("MKV").tolist()
    assert tok.encode("MKV").dtype == np.uint8
    assert tok.with_specials(tok.encode("")).tolist() == [tok.CLS, tok.EOS]


@pytest.mark.parametrize(
    "seq,letter,pos", [("MKJV", "J", 3), ("MK*V", "*", 3), ("M K", " ", 2), ("MKé", "é", 3), ("MK**", "*", 3)]
)
def test_invalid_letters(seq, letter, pos):
    with pytest.raises(tok.InvalidSequenceError) as e:
        tok.encode(seq)
    assert (e.value.letter, e.value.position + 1) == (letter, pos)
    assert f"position {pos}" in str(e.value)
    assert tok.encode(seq, policy="skip") is None
    fixed = tok.encode(seq, policy="x")
    assert tok.decode(fixed)[pos - 1] == "X" and len(fixed) == len(seq.rstrip("*")) + (seq == "MK**")
    with pytest.raises(ValueError):
        tok.encode("MK", policy="drop")
