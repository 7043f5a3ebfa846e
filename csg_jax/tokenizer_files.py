"""Write a small CLIP-style BPE tokenizer folder from a word list (offline; for tests and demos).

The folder has the same files as the `tokenizer/` folder of a Stable Diffusion 1.x checkpoint
(`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`; no
`tokenizer.json`) and loads with `transformers.CLIPTokenizer.from_pretrained(folder)`. In
transformers 5, `CLIPTokenizer` is the `tokenizers`-backed class (the former
`CLIPTokenizerFast`, which remains an alias); it rebuilds the byte-level BPE from vocab + merges.

Vocabulary layout, like OpenAI's CLIP vocab (whose ids 0..511 are exactly these):
  ids 0..255    the 256 byte-level characters of GPT-2/CLIP (`bytes_to_unicode`),
  ids 256..511  the same characters with the end-of-word marker `</w>` appended,
  then          the products of the merges, in merge order,
  last two      `<|startoftext|>` (BOS) and `<|endoftext|>` (EOS, also UNK and PAD as in SD1).

Merges are chosen so that every listed word (lowercase) encodes to the single token
`word</w>`. The BPE in `tokenizers` applies merges by *rank* (lowest first), not left to right,
so independent per-word left-to-right chains can break each other: with the words "at" and
"cat", the merge `a t</w>` (rank 0) turns "cat" into `c` + `at</w>`, a pair with no merge. We
therefore add words one at a time: encode the word with the merges so far (an exact simulation of
rank-based BPE), then merge the resulting pieces left to right with new, lowest-priority merges.
New merges cannot change words already encoded as one token (a one-token word has no pair left,
and at every earlier step an older, higher-priority merge applied), so all words stay single
tokens. For the first word, and for any word that shares no merges with earlier ones, this is
exactly the plain left-to-right chain c1+c2, (c1c2)+c3, ...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

# Words the CLIP pre-tokenizer keeps in one piece: a run of letters (no digits, no punctuation).
_WORD_RE = re.compile(r"[^\W\d_]+")

DEFAULT_WORDS: list[str] = [
    # function words
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "by", "to", "from", "is", "are",
    "its", "his", "her", "their", "near", "under", "over", "behind", "next", "front", "top",
    "two", "three", "some", "very",
    # image words
    "photo", "picture", "image", "painting", "drawing", "sketch", "close", "up", "view",
    # animals
    "cat", "dog", "wolf", "lion", "tiger", "zebra", "horse", "cow", "sheep", "bird", "fox",
    "bear", "rabbit", "mouse", "monkey", "elephant", "giraffe", "kitten", "puppy", "animal",
    # people
    "person", "man", "woman", "boy", "girl", "child", "people", "face",
    # accessories and clothes
    "glasses", "sunglasses", "hat", "shirt", "dress", "collar",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "gray", "grey",
    "pink", "brown", "gold", "silver", "dark", "bright", "colorful",
    # shapes
    "circle", "square", "triangle", "star", "cross", "shape", "line",
    # scene
    "background", "grass", "sky", "tree", "trees", "house", "car", "road", "street", "water",
    "sea", "beach", "snow", "field", "forest", "mountain", "river", "flower", "flowers",
    "garden", "table", "chair", "bed", "couch", "floor", "wall", "window", "door", "room",
    "city", "sun", "moon", "cloud", "clouds",
    # attributes
    "small", "big", "large", "cute", "little", "old", "young", "happy", "fluffy", "furry",
    "wooden", "beautiful",
    # actions
    "sitting", "standing", "lying", "running", "walking", "looking", "playing", "sleeping",
    "holding", "wearing", "eating",
    # fruit / objects
    "apple", "banana", "ball", "book", "cup", "bottle", "toy",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + k) in order.
    Dict order is CLIP's vocab order for ids 0..255.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    """Initial BPE symbols of a pre-tokenized word: byte-level chars, last one with `</w>`."""
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    chars[-1] += EOW
    return chars


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Rank-based BPE as in `tokenizers` / CLIP: repeatedly merge the lowest-rank adjacent pair
    (leftmost occurrence on ties) until no adjacent pair is a merge."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(
            range(len(symbols) - 1),
            key=lambda i: (ranks.get((symbols[i], symbols[i + 1]), float("inf")), i),
        )
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, ranked merges) such that each word encodes to one token `word</w>`.

    words: letters only (any case; lowercased, duplicates ignored). Raises ValueError otherwise.
    """
    byte_encoder = bytes_to_unicode()
    base = list(byte_encoder.values())
    tokens = base + [c + EOW for c in base]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    for raw in words:
        word = raw.strip().lower()
        if not _WORD_RE.fullmatch(word):
            raise ValueError(
                f"cannot make {raw!r} a single CLIP token: words must be non-empty runs of "
                "letters (the CLIP pre-tokenizer splits at spaces, digits and punctuation)"
            )
        pieces = _bpe(_symbols(word, byte_encoder), ranks)
        # Merge what is left, left to right, with new merges of the lowest priority.
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            product = pair[0] + pair[1]
            vocab.setdefault(product, len(vocab))
            pieces = [product] + pieces[2:]

    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str],
                         model_max_length: int = 77) -> int:
    """Write a CLIP tokenizer folder for `words` (see the module docstring); return the vocab size.

    Load it with `transformers.CLIPTokenizer.from_pretrained(folder)`. Pad token is
    `<|endoftext|>` (SD1 convention), `model_max_length` goes to `tokenizer_config.json`.
    """
    vocab, merges = build_vocab_and_merges(words)
    os.makedirs(folder, exist_ok=True)

    def dump(name, obj):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")

    dump("vocab.json", vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # header line of CLIP's merges file; readers skip it
        f.writelines(f"{a} {b}\n" for a, b in merges)

    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    dump("special_tokens_map.json", special)
    dump(
        "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": int(model_max_length),
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": True,
            "add_prefix_space": False,
            **special,
        },
    )
    return len(vocab)
