"""The ESM-2 33-token vocabulary: ids of every token, the one definition (plmrun.tokenizer encodes with it).

Here, in the model package, because `plmrun export` ships this package's modules as they are and the
model needs the vocabulary size and the <mask> id.
"""

VOCAB = [
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    "L",
    "A",
    "G",
    "V",
    "S",
    "E",
    "R",
    "T",
    "I",
    "D",
    "P",
    "K",
    "Q",
    "N",
    "F",
    "Y",
    "M",
    "H",
    "W",
    "C",
    "X",
    "B",
    "U",
    "Z",
    "O",
    ".",
    "-",
    "<null_1>",
    "<mask>",
]
VOCAB_SIZE = len(VOCAB)
CLS, PAD, EOS, UNK = 0, 1, 2, 3
MASK = VOCAB.index("<mask>")
