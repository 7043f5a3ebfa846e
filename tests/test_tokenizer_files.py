"""The offline CLIP tokenizer folder loads with transformers and gives one token per listed word."""

import json

import pytest
import transformers

from csg_jax.tokenizer_files import (
    BOS, DEFAULT_WORDS, EOS, EOW, build_vocab_and_merges, bytes_to_unicode, write_clip_tokenizer,
)

REQUIRED = (
    "a an the of on in with and photo picture image cat dog wolf lion zebra horse glasses red "
    "green blue yellow orange purple white black gray pink brown circle square triangle star "
    "cross background small big cute little sitting grass sky tree house car person man woman"
).split()


@pytest.fixture(scope="module")
def folder_and_size(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    return folder, write_clip_tokenizer(folder, DEFAULT_WORDS)


@pytest.fixture(scope="module")
def tok(folder_and_size):
    return transformers.CLIPTokenizer.from_pretrained(str(folder_and_size[0]))


def test_default_words():
    assert set(REQUIRED) <= set(DEFAULT_WORDS)
    assert 120 <= len(DEFAULT_WORDS) <= 200
    assert len(set(DEFAULT_WORDS)) == len(DEFAULT_WORDS)


def test_files_and_vocab_size(folder_and_size, tok):
    folder, size = folder_and_size
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == size == len(tok)
    assert sorted(vocab.values()) == list(range(size))
    # CLIP layout: bytes, bytes + </w>, merge products, BOS, EOS last.
    chars = list(bytes_to_unicode().values())
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512] == chars + [
        c + EOW for c in chars]
    assert vocab[BOS] == size - 2 and vocab[EOS] == size - 1
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(merges) == len(set(merges))
    assert all("".join(m.split(" ")) in vocab for m in merges)


def test_special_tokens(tok):
    assert tok.bos_token == BOS and tok.eos_token == EOS
    assert tok.pad_token == EOS and tok.pad_token_id == tok.eos_token_id  # SD1 convention
    assert tok.model_max_length == 77


def test_each_word_is_one_token(tok):
    vocab = tok.get_vocab()
    for word in DEFAULT_WORDS:
        assert tok(word).input_ids == [tok.bos_token_id, vocab[word + EOW], tok.eos_token_id], word
        # CLIP lowercases, so capitalised words are the same token.
        assert tok(word.capitalize()).input_ids == tok(word).input_ids


def test_sentence_one_id_per_word(tok):
    sentence = "a photo of a cute little cat sitting on the grass with glasses"
    ids = tok(sentence).input_ids
    vocab = tok.get_vocab()
    assert ids == [tok.bos_token_id] + [vocab[w + EOW] for w in sentence.split()] + [
        tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == sentence


def test_unknown_word_splits(tok):
    ids = tok("zzyzx cat").input_ids
    pieces = tok.convert_ids_to_tokens(ids[1:-1])
    assert len(pieces) > 2 and pieces[-1] == "cat</w>"
    assert "".join(pieces[:-1]) == "zzyzx" + EOW
    assert tok.unk_token_id not in ids[1:-1]


def test_padding_to_max_length(tok):
    enc = tok("a photo of a dog", padding="max_length", max_length=77, truncation=True)
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:7] == tok("a photo of a dog").input_ids
    assert enc.input_ids[7:] == [tok.pad_token_id] * 70
    long = tok(" ".join(["cat"] * 100), padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == tok.eos_token_id


def test_rank_order_does_not_break_words():
    """With "at" first, a naive left-to-right chain would encode "cat" as c + at</w>."""
    from csg_jax.tokenizer_files import _bpe, _symbols

    words = ["at", "cat", "hat", "what", "that", "a"]
    vocab, merges = build_vocab_and_merges(words)
    ranks = {m: i for i, m in enumerate(merges)}
    enc = bytes_to_unicode()
    for w in words:
        assert _bpe(_symbols(w, enc), ranks) == [w + EOW]


def test_rejects_non_words(tmp_path):
    with pytest.raises(ValueError, match="letters"):
        write_clip_tokenizer(tmp_path, ["cat", "dog's"])
