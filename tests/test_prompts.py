"""Task parsing, target prompts, token spans, length checks and token matching."""

import numpy as np
import pytest
import transformers

from csg_jax.errors import PromptError
from csg_jax.prompts import (
    build_target_prompt, check_length, match_tokens, most_similar_word, parse_task, token_span,
)
from csg_jax.tokenizer_files import DEFAULT_WORDS, write_clip_tokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts_clip_tokenizer")
    write_clip_tokenizer(folder, DEFAULT_WORDS)
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


# --- tasks --------------------------------------------------------------------------------

@pytest.mark.parametrize("task,expected", [
    ("cat2dog", ("cat", ["dog"])),
    ("zebra2horse", ("zebra", ["horse"])),
    ("dog2dog with glasses", ("dog", ["dog", "with", "glasses"])),
    ("  Cat2Dog  ", ("cat", ["dog"])),
    ("dog2 dog  with glasses", ("dog", ["dog", "with", "glasses"])),
])
def test_parse_task(task, expected):
    assert parse_task(task) == expected


@pytest.mark.parametrize("task,msg", [
    ("catdog", 'exactly one "2"'),
    ("cat2dog2wolf", 'exactly one "2"'),
    ("2dog", "empty source"),
    ("cat2", "empty target"),
    ("big cat2dog", "single word"),
    ("cat2dog!", "letters and spaces"),
])
def test_parse_task_errors(task, msg):
    with pytest.raises(PromptError, match=msg) as err:
        parse_task(task)
    assert "cat2dog" in str(err.value)  # the message shows a valid example


# --- target prompts -------------------------------------------------------------------------

def test_replace_single_word():
    assert build_target_prompt("a photo of a cat", "cat2dog") == ("a photo of a dog", "cat")


def test_replace_multi_word_target_and_case():
    prompt = "A Cat sitting on the grass, cat toy"
    assert build_target_prompt(prompt, "cat2dog with glasses") == (
        "A dog with glasses sitting on the grass, cat toy", "Cat")


def test_replace_whole_word_only():
    # "cat" inside "catalog" is not the word; the first whole word is replaced.
    assert build_target_prompt("a catalog with a cat.", "cat2dog") == (
        "a catalog with a dog.", "cat")


def test_missing_word_without_fallback():
    with pytest.raises(PromptError, match="does not appear") as err:
        build_target_prompt("a photo of a kitten", "cat2dog")
    assert "--target-prompt" in str(err.value)


def _fake_embed(words):
    """Hand-made 3-d embeddings: cat and kitten nearly parallel, the rest elsewhere."""
    table = {"cat": [1.0, 0.1, 0.0], "kitten": [2.0, 0.3, 0.0], "photo": [0.0, 1.0, 0.0],
             "a": [0.1, 0.0, 1.0], "of": [0.0, 0.2, 1.0], "on": [0.0, 0.5, 1.0],
             "grass": [0.3, 1.0, 0.3]}
    return np.array([table[w] for w in words])


def test_similar_word_fallback():
    calls = []

    def similar(candidates, word):
        calls.append((candidates, word))
        return most_similar_word(candidates, word, _fake_embed)

    out = build_target_prompt("A photo of a Kitten on grass", "cat2dog", similar)
    assert out == ("A photo of a dog on grass", "Kitten")
    assert calls == [(["a", "photo", "of", "kitten", "on", "grass"], "cat")]


def test_similar_word_must_be_a_prompt_word():
    with pytest.raises(PromptError, match="not a word of the source prompt"):
        build_target_prompt("a photo of a kitten", "cat2dog", lambda c, w: "tiger")


def test_most_similar_word_is_cosine_not_dot():
    # "big" has the largest dot product with the query but a worse angle than "near".
    emb = {"big": [10.0, 10.0], "near": [1.0, 0.05], "q": [1.0, 0.0]}
    assert most_similar_word(["big", "near"], "q", lambda ws: np.array([emb[w] for w in ws])) \
        == "near"


# --- token spans ----------------------------------------------------------------------------

def test_token_span_single_token_words(tok):
    prompt = "a photo of a cat sitting on the grass"
    assert token_span(tok, prompt, "cat") == (5, 6)  # BOS a photo of a [cat]
    assert token_span(tok, prompt, "a") == (1, 2)    # first occurrence
    assert token_span(tok, prompt, "Grass") == (9, 10)
    # Same as the official "word index + 1" when every word is one token.
    assert token_span(tok, prompt, "cat")[0] == prompt.split().index("cat") + 1


def test_token_span_multi_token_word(tok):
    prompt = "a zzyzx, sitting on the grass"
    n = len(tok("zzyzx", add_special_tokens=False).input_ids)
    assert n > 1
    assert token_span(tok, prompt, "zzyzx") == (2, 2 + n)
    # Everything after the multi-token word shifts by n - 1 (+1 for the comma token).
    assert token_span(tok, prompt, "sitting") == (2 + n + 1, 2 + n + 2)
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens(ids[2 + n + 1]) == "sitting</w>"


def test_token_span_phrase_and_missing(tok):
    assert token_span(tok, "a dog with glasses on grass", "dog with glasses") == (2, 5)
    with pytest.raises(PromptError, match="does not appear"):
        token_span(tok, "a photo of a cat", "dog")
    with pytest.raises(PromptError, match="does not appear"):
        token_span(tok, "a photo of a catalog", "cat")


def test_token_span_beyond_max_length(tok):
    prompt = " ".join(["cat"] * 80) + " dog"
    with pytest.raises(PromptError, match="beyond"):
        token_span(tok, prompt, "dog")


# --- length -----------------------------------------------------------------------------------

def test_check_length_short_prompt_untouched(tok):
    assert check_length(tok, "a photo of a cat") == ("a photo of a cat", None)


def test_check_length_truncates_with_warning(tok):
    prompt = " ".join(["cat"] * 80)
    out, warning = check_length(tok, prompt)
    assert out == " ".join(["cat"] * 75)
    assert len(tok(out).input_ids) == 77
    assert "80 tokens" in warning and "dropped the last 5 tokens" in warning


def test_check_length_cuts_at_whole_chunks(tok):
    # 74 single-token words, then a multi-token word that does not fit: it is dropped whole.
    n_z = len(tok("zzyzx", add_special_tokens=False).input_ids)
    prompt = " ".join(["dog"] * 74) + " zzyzx cat"
    out, warning = check_length(tok, prompt, max_length=77)
    assert out == " ".join(["dog"] * 74)
    assert f"dropped the last {n_z + 1} tokens" in warning and "'zzyzx cat'" in warning


# --- token matching ----------------------------------------------------------------------------

def test_match_tokens_hand_made():
    """Source "BOS a cat on grass", target "BOS a dog with glasses on grass" (T = 8, d = 4).

    Target rows are built to be closest to known source rows; position 2 ("dog") is closest to
    source 4 ("grass") by construction but is then forced to the source word "cat" (1), as
    are "with" and "glasses" (3, 4). Target rows beyond n_target_words are untouched (p -> p).
    """
    e = np.eye(4)
    src = np.zeros((8, 4))
    src[0], src[1], src[2], src[3], src[4] = e[0], e[1], e[2], e[3], e[0] + e[1] + 0.1 * e[3]
    src[5:] = e[3]  # padding rows that must not be candidates (n_source_words = 4)
    tgt = np.zeros((8, 4))
    tgt[1] = 2 * e[1] + 0.1 * e[0]          # "a"       -> source 1 ("a")
    tgt[2] = e[0] + e[1] + 0.2 * e[3]       # "dog"     -> source 4 (by similarity)
    tgt[3] = e[0]                           # "with"    -> source 0 (BOS)
    tgt[4] = e[2] + 0.01 * e[1]             # "glasses" -> source 2
    tgt[5] = e[3]                           # "on"      -> source 3
    tgt[6] = 5 * e[3]                       # "grass"   -> source 3 (rows 5+ excluded)
    tgt[7] = e[1]                           # beyond n_target_words: identity

    unforced = match_tokens(src, tgt, n_source_words=4, n_target_words=6)
    assert unforced.dtype == np.int32 and unforced.shape == (8,)
    np.testing.assert_array_equal(unforced, [0, 1, 4, 0, 2, 3, 3, 7])

    forced = match_tokens(src, tgt, 4, 6, forced=((2, 5), 2))
    np.testing.assert_array_equal(forced, [0, 1, 2, 2, 2, 3, 3, 7])


def test_match_tokens_identity_for_same_prompt():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(77, 16))
    np.testing.assert_array_equal(match_tokens(states, states, 10, 10), np.arange(77))


def test_match_tokens_errors():
    s = np.zeros((8, 4))
    with pytest.raises(ValueError, match="shape"):
        match_tokens(s, np.zeros((8, 3)), 2, 2)
    with pytest.raises(ValueError, match="outside"):
        match_tokens(s, s, 2, 2, forced=((7, 9), 1))
