"""Prompt planning on the host: the target prompt, the edited words' token positions, and the
batched text conditioning (:class:`~csg_jax.editing.core.Prompts`) every method's program takes.

``plan_prompts`` -> :class:`PromptPlan` (plain Python, goes into meta.json); ``batch_prompts``
stacks plans into one :class:`Prompts` batch, Prompt-to-Prompt's token alignment and LocalBlend
word columns included (:mod:`csg_jax.editing.p2p_align`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from csg_jax import prompts as P
from csg_jax.editing import p2p_align
from csg_jax.editing.core import Prompts
from csg_jax.errors import PromptError


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """Everything about one image's prompts, in plain Python (goes into meta.json)."""

    source_prompt: str
    target_prompt: str
    negative_prompt: str
    source_word: str
    target_words: str
    source_span: tuple[int, int]  # token positions [start, end), BOS = 0
    target_span: tuple[int, int]
    ref_columns: tuple[int, ...]  # (77,) source column for each target column
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ref_columns_changed"] = {i: c for i, c in enumerate(self.ref_columns) if c != i}
        del d["ref_columns"]
        return d


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else 0


def _word_states_fn(pipe):
    """Embeds single words: mean final text-encoder state over the word's tokens."""

    def embed(words: list[str]) -> np.ndarray:
        states = np.asarray(pipe.embed(list(words)))
        out = []
        for w, s in zip(words, states):
            n = max(1, _token_count(pipe.tokenizer, w))
            out.append(s[1 : 1 + n].mean(0))
        return np.stack(out)

    return embed


def plan_prompts(pipe, source_prompt: str, task: Optional[str] = None, target_prompt: Optional[str] = None,
                 source_word: Optional[str] = None, negative: str = "source", *, target_words: Optional[str] = None,
                 word_hints: Sequence[str] = ()) -> PromptPlan:
    """Build the target prompt (from a task) and locate the source word's and target words' tokens.

    ``target_words`` (with ``target_prompt``; may be ""): the edited words of the target prompt are
    given (PIE-Bench's brackets), so the target span is where they occur in the target prompt, not
    at the source word's position (an addition puts its words elsewhere), and ``source_word`` may be
    empty. ``word_hints``: (source word, target word) to try when either is empty (PIE-Bench's
    ``blended_word``); see :func:`_explicit_words`. Without ``target_words`` the words come from the
    first difference of the prompts, as before.
    """
    tok = pipe.tokenizer
    warnings = []
    target_match = None  # where the target words are, when they are given explicitly
    source_prompt, warn = P.check_length(tok, " ".join(source_prompt.split()), pipe.max_length)
    if warn:
        warnings.append(warn)
    if not source_prompt:
        raise PromptError("The source prompt is empty; describe the image, e.g. 'a photo of a cat'.")
    if (task is None) == (target_prompt is None):
        raise PromptError("Give exactly one of a task (e.g. 'cat2dog') or a target prompt.")
    if task is not None:
        word, target_words = P.parse_task(task)
        similar = lambda candidates, w: P.most_similar_word(candidates, w, _word_states_fn(pipe))
        target_prompt, replaced = P.build_target_prompt(source_prompt, task, similar_word_fn=similar)
        if replaced.lower() != word.lower():
            warnings.append(f"'{word}' is not in the source prompt; editing the most similar word '{replaced}' instead.")
        source_word, target_text = replaced, " ".join(target_words)
    else:
        target_prompt, warn = P.check_length(tok, " ".join(target_prompt.split()), pipe.max_length)
        if warn:
            warnings.append(warn)
        if target_words is None:
            source_word, target_text = _diff_words(source_prompt, target_prompt, source_word)
        else:
            source_word, target_text, target_match, notes = _explicit_words(
                source_prompt, target_prompt, source_word, target_words, word_hints)
            warnings.extend(notes)
    match = P.find_word(source_prompt, source_word)
    if match is None:
        raise PromptError(f"The word {source_word!r} does not appear in the source prompt {source_prompt!r}.")
    prefix = source_prompt[: match.start()]
    start = 1 + _token_count(tok, prefix)
    source_span = (start, start + _token_count(tok, match.group(0)))
    if target_match is None:
        target_span = (start, start + max(1, _token_count(tok, target_text)))
    else:
        t_start = 1 + _token_count(tok, target_prompt[: target_match.start()])
        target_span = (t_start, t_start + _token_count(tok, target_match.group(0)))
    limit = pipe.max_length - 1
    if source_span[1] > limit or target_span[1] > limit:
        raise PromptError(f"The edited word lies beyond the {limit - 1} tokens the text encoder sees; shorten the prompt.")

    states = np.asarray(pipe.embed([source_prompt, target_prompt]))
    n_src = _token_count(tok, source_prompt)
    n_tgt = _token_count(tok, target_prompt)
    ref = P.match_tokens(states[0], states[1], n_src, n_tgt, forced=(target_span, source_span[0]))
    neg = source_prompt if negative == "source" else ""
    return PromptPlan(source_prompt, target_prompt, neg, source_word, target_text, source_span, target_span,
                      tuple(int(c) for c in ref), tuple(warnings))


def _diff_words(source_prompt: str, target_prompt: str, source_word: Optional[str]) -> tuple[str, str]:
    """(source word, target text) for a directly given target prompt: the first differing word."""
    s, t = source_prompt.split(), target_prompt.split()
    if source_word is not None:
        return source_word, source_word
    for i, (a, b) in enumerate(zip(s, t)):
        if a.lower() != b.lower():
            j = len(t) - (len(s) - i) if len(t) >= len(s) else i
            return re.sub(r"[^\w]", "", a) or a, " ".join(t[i : max(i + 1, j + 1)])
    if len(t) > len(s):
        return s[-1], " ".join(t[len(s) - 1 :])
    raise PromptError(
        "The target prompt is the source prompt: nothing marks the word to edit. Give a different target "
        "prompt, a task such as 'cat2dog', or name the word with source_word / --source-word."
    )


def _leading_phrase(prompt: str, words: str) -> Optional[re.Match]:
    """The first occurrence of ``words`` as one phrase, else of its longest leading run of words
    that occurs (bracket groups apart, "[red] car with [blue] wheels", are joined as "red blue")."""
    parts = words.split()
    for k in range(len(parts), 0, -1):
        match = P.find_word(prompt, " ".join(parts[:k]))
        if match is not None:
            return match
    return None


def _explicit_words(source_prompt: str, target_prompt: str, source_word: Optional[str], target_words: str,
                    hints: Sequence[str]) -> tuple[str, str, Optional[re.Match], list[str]]:
    """(source word, target text, match of the target text in the target prompt or None, warnings)
    for explicitly given edited words.

    Source: ``source_word`` (or its longest leading run that occurs in the source prompt); if none
    (an addition): ``hints[0]`` if it occurs there, else the first differing word. Target: the
    target words in the target prompt; if none (a deletion): ``hints[1]`` if it occurs there, else
    None (the caller puts the span at the source word's position). Each fallback adds a warning.
    """
    warnings = []
    hints = tuple(hints) + ("", "")
    given = " ".join((source_word or "").split())
    none = f"no source words {'found' if given else 'marked'}"
    found = _leading_phrase(source_prompt, given) if given else None
    if found is not None:
        if found.group(0).lower().split() != given.lower().split():
            warnings.append(f"the source words {given!r} do not occur together; editing {found.group(0)!r}.")
        source = found.group(0)
    elif hints[0] and P.find_word(source_prompt, hints[0]) is not None:
        source = P.find_word(source_prompt, hints[0]).group(0)
        warnings.append(f"{none}; editing {source!r} (the blended word).")
    else:
        source = _diff_words(source_prompt, target_prompt, None)[0]
        warnings.append(f"{none}; editing the first differing word {source!r}.")
    wanted = " ".join(target_words.split())
    none = f"no target words {'found' if wanted else 'marked'}"
    found = _leading_phrase(target_prompt, wanted) if wanted else None
    if found is not None and found.group(0).lower().split() != wanted.lower().split():
        warnings.append(f"the target words {wanted!r} do not occur together; using {found.group(0)!r}.")
    if found is None and hints[1]:
        found = P.find_word(target_prompt, hints[1])
        if found is not None:
            warnings.append(f"{none}; using {found.group(0)!r} (the blended word).")
    if found is None:
        warnings.append(f"{none}; the target span sits at the source word's position.")
        return source, "", None, warnings
    return source, found.group(0), found, warnings


def _span_arrays(spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token spans -> (B, K) int32 positions (padded with the first) and (B, K) weights 1/len (0 on padding)."""
    k = max(end - start for start, end in spans)
    cols = np.zeros((len(spans), k), np.int32)
    wts = np.zeros((len(spans), k), np.float32)
    for i, (start, end) in enumerate(spans):
        span = list(range(start, end))
        cols[i, : len(span)] = span
        cols[i, len(span):] = span[0]
        wts[i, : len(span)] = 1.0 / len(span)
    return cols, wts


def word_spans(tokenizer, prompt: str, words: str) -> list[tuple[int, int]]:
    """Token spans [start, end) (BOS = 0) of each occurrence of each whitespace-separated word of
    ``words`` in ``prompt``; PromptError if a word does not occur."""
    spans = []
    for word in words.split():
        found = False
        for match in P.word_matches(prompt, word):
            start = 1 + _token_count(tokenizer, prompt[: match.start()])
            spans.append((start, start + _token_count(tokenizer, match.group(0))))
            found = True
        if not found:
            raise PromptError(f"The equalizer word {word!r} does not appear in the target prompt {prompt!r}.")
    return spans


def _blend_columns(tokenizer, plan: PromptPlan, width: int) -> np.ndarray:
    """(2, width) LocalBlend word columns as the released ``LocalBlend`` builds them (every token of
    every occurrence, ``get_word_inds``); a word it cannot find (punctuation attached, say) falls back
    to its span, where the released code would divide by a zero map."""
    out = np.zeros((2, width), np.float32)
    for row, (prompt, words, span) in enumerate(((plan.source_prompt, plan.source_word, plan.source_span),
                                                  (plan.target_prompt, plan.target_words, plan.target_span))):
        idx = [i for word in words.split() for i in p2p_align.word_token_indices(tokenizer, prompt, word)]
        idx = [i for i in idx if i < width] or list(range(span[0], min(span[1], width)))
        out[row, idx] = 1.0
    return out


def batch_prompts(pipe, plans: Sequence[PromptPlan], equalizer_words: Optional[str] = None,
                  token_alignment: str = "released") -> Prompts:
    """Stack per-image prompt plans into one :class:`Prompts` batch.

    ``equalizer_words``: words of the target prompts whose cross-attention columns Prompt-to-Prompt's
    equalizer re-weights (default: the target words). ``token_alignment``: Prompt-to-Prompt's
    column mapping, "released" (:func:`p2p_align.align`) or "similarity" (``ref_columns``).
    """
    texts = [p.source_prompt for p in plans] + [p.negative_prompt for p in plans] + [p.target_prompt for p in plans]
    states = pipe.embed(texts)
    b = len(plans)
    cols, wts = _span_arrays([p.source_span for p in plans])
    target = np.zeros((b, pipe.max_length), np.float32)
    reweight = np.zeros((b, pipe.max_length), np.float32)
    for i, p in enumerate(plans):
        start, end = p.target_span
        target[i, start:end] = 1.0 / (end - start)
        spans = [p.target_span] if equalizer_words is None else word_spans(pipe.tokenizer, p.target_prompt, equalizer_words)
        for start, end in spans:
            reweight[i, start : min(end, pipe.max_length)] = 1.0
    ref = np.asarray([p.ref_columns for p in plans], np.int32)
    n = pipe.max_length
    if token_alignment == "released":
        aligned = [p2p_align.align(pipe.tokenizer, p.source_prompt, p.target_prompt, n) for p in plans]
    else:
        aligned = [p2p_align.similarity_alignment(p.ref_columns, n) for p in plans]
    blend = np.stack([_blend_columns(pipe.tokenizer, p, n) for p in plans])
    return Prompts(states[:b], states[b : 2 * b], states[2 * b :], jnp.asarray(cols), jnp.asarray(wts), jnp.asarray(ref),
                       jnp.asarray(target), jnp.asarray(reweight), jnp.asarray(np.stack([a.matrix for a in aligned])),
                       jnp.asarray(np.stack([a.keep for a in aligned])), jnp.asarray(blend))
