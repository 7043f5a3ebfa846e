"""Prompt-to-Prompt's token alignment as released (google/prompt-to-prompt ``seq_aligner.py`` and
``ptp_utils.get_word_inds``), re-derived in plain Python + numpy.

The released controllers map the source prompt's cross-attention onto the target prompt's token
columns with one of two rules, chosen by the notebook's ``is_replace_controller``:

* **word swap** (``AttentionReplace``), prompts with the same number of space-separated words: a
  (77, 77) matrix ``M[s, t]`` (target column t reads ``sum_s p_src[s] M[s, t]``). Unchanged words map
  one to one; a swapped word of k source tokens and k' target tokens maps token i to token i when
  k == k', else every target token reads the mean of the k source tokens (weight 1/k' each -- the
  released code's ``ratio``). After the last swapped word the released loop writes ``M[j, j] = 1``
  (the target index on both sides), so when a swap changed the token count the tail is *not*
  shifted back into alignment; we do the same.
* **refinement** (``AttentionRefine``), any other pair (words added or removed): a global alignment
  of the two token sequences (Needleman-Wunsch, gap 0, match 1, mismatch -1, ties resolved
  left > up > diagonal as in the released traceback), giving for each target token its source
  token or none; ``alpha`` = 1 where one exists. Target columns beyond the target's tokens read
  their own index. The target then uses ``alpha * p_src[mapper] + (1 - alpha) * p_tgt``.

``word_token_indices`` is ``get_word_inds``: the token positions (BOS = 0) of every occurrence of a
space-separated word, found by decoding each token and counting characters.

The tokenizer is anything with ``encode(text) -> ids`` (BOS ... EOS) and ``decode([id]) -> str``
(``transformers``' CLIPTokenizer).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np


class Alignment(NamedTuple):
    """How the target prompt's cross-attention columns read the source prompt's (one image)."""

    matrix: np.ndarray  # (T, T) float32: reference column t = sum_s p_src[s] matrix[s, t]
    keep: np.ndarray  # (T,) float32: share of the target's own column kept (refinement: 1 - alpha)
    mode: str  # "replace" (word swap) or "refine"


def word_token_indices(tokenizer, text: str, word: Union[str, int]) -> list[int]:
    """Token positions (BOS = 0) of ``word`` (every space-separated word equal to it, or the word at
    that index) in ``text``, as ``ptp_utils.get_word_inds``."""
    words = text.split(" ")
    places = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [int(word)]
    if not places:
        return []
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, length, ptr = [], 0, 0
    for i, piece in enumerate(pieces):
        length += len(piece)
        if ptr in places:
            out.append(i + 1)
        if ptr < len(words) and length >= len(words[ptr]):
            ptr, length = ptr + 1, 0
    return out


def replacement_matrix(tokenizer, source: str, target: str, max_len: int = 77) -> np.ndarray:
    """(max_len, max_len) word-swap matrix of ``seq_aligner.get_replacement_mapper`` (see module doc);
    ValueError if the prompts differ in their number of space-separated words."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise ValueError(f"a word swap needs prompts of as many words: {len(src_words)} vs {len(tgt_words)}")
    swapped = [i for i in range(len(tgt_words)) if tgt_words[i] != src_words[i]]
    spans = [(word_token_indices(tokenizer, source, i), word_token_indices(tokenizer, target, i)) for i in swapped]
    m = np.zeros((max_len, max_len), np.float32)
    i = j = k = 0
    while i < max_len and j < max_len:
        if k < len(spans) and spans[k][0] and spans[k][0][0] == i:
            src, tgt = spans[k]
            if len(src) == len(tgt):
                m[src, tgt] = 1.0
            else:
                for t in tgt:
                    m[src, t] = 1.0 / len(tgt)
            k += 1
            i += len(src)
            j += len(tgt)
        elif k < len(spans):
            m[i, j] = 1.0
            i += 1
            j += 1
        else:  # released: the diagonal of the *target* index once every swap is placed
            m[j, j] = 1.0
            i += 1
            j += 1
    return m


def _global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each element of y, the index of the x element aligned with it, or -1 (gap 0, match 1,
    mismatch -1; at equal scores the traceback prefers a gap in x, then a gap in y, then a match)."""
    nx, ny = len(x), len(y)
    score = np.zeros((nx + 1, ny + 1), np.int64)
    move = np.zeros((nx + 1, ny + 1), np.int8)  # 1: y[b-1] against a gap, 2: x[a-1] against a gap, 3: x[a-1] with y[b-1]
    move[0, 1:], move[1:, 0] = 1, 2
    for a in range(1, nx + 1):
        for b in range(1, ny + 1):
            left, up = score[a, b - 1], score[a - 1, b]
            diag = score[a - 1, b - 1] + (1 if x[a - 1] == y[b - 1] else -1)
            best = max(left, up, diag)
            score[a, b] = best
            move[a, b] = 1 if best == left else 2 if best == up else 3
    out = [-1] * ny
    a, b = nx, ny
    while a > 0 or b > 0:
        if move[a, b] == 3:
            a, b = a - 1, b - 1
            out[b] = a
        elif move[a, b] == 1:
            b -= 1
        else:
            a -= 1
    return out


def refinement_alignment(tokenizer, source: str, target: str, max_len: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """(mapper (max_len,) int32, alpha (max_len,) float32) of ``seq_aligner.get_refinement_mapper``:
    target token t reads source token mapper[t] where alpha[t] = 1; beyond the target's tokens
    (BOS and EOS included) mapper is the identity."""
    x, y = list(tokenizer.encode(source)), list(tokenizer.encode(target))
    aligned = _global_alignment(x, y)[:max_len]
    mapper = np.arange(max_len, dtype=np.int32)
    alpha = np.ones(max_len, np.float32)
    for t, s in enumerate(aligned):
        mapper[t] = s if s >= 0 else max_len - 1  # released: index -1 (the last column) times alpha 0
        alpha[t] = 1.0 if s >= 0 else 0.0
    return mapper, alpha


def align(tokenizer, source: str, target: str, max_len: int = 77) -> Alignment:
    """The released controller's alignment of one prompt pair: a word swap when both prompts have
    as many space-separated words, else a refinement (as the null-text notebook's ``make_controller``
    is called for its examples)."""
    if len(source.split(" ")) == len(target.split(" ")):
        return Alignment(replacement_matrix(tokenizer, source, target, max_len), np.zeros(max_len, np.float32), "replace")
    mapper, alpha = refinement_alignment(tokenizer, source, target, max_len)
    m = np.zeros((max_len, max_len), np.float32)
    m[mapper, np.arange(max_len)] = alpha
    return Alignment(m, (1.0 - alpha).astype(np.float32), "refine")


def similarity_alignment(ref_columns: Sequence[int], max_len: int = 77) -> Alignment:
    """The ``token_alignment="similarity"`` option as an :class:`Alignment`: target column t reads
    source column ``ref_columns[t]`` (CSG's token matching, :func:`csg_jax.prompts.match_tokens`)."""
    m = np.zeros((max_len, max_len), np.float32)
    m[np.asarray(ref_columns, np.int64)[:max_len], np.arange(max_len)] = 1.0
    return Alignment(m, np.zeros(max_len, np.float32), "similarity")
