"""Prompt handling for CSG editing tasks: task names, target prompts, token spans, token matching.

Pure Python + numpy. The tokenizer is passed in (anything called like a `transformers`
tokenizer: `tokenizer(text, add_special_tokens=False)["input_ids"]`, and a batch of texts the same
way); text-encoder embeddings come in through plain callables / arrays, so this module has no model
code. Token positions count the BOS token as position 0, like the text encoder's output states.

Behaviour follows the authors' code (see docs csg-reference.md, "Defaults" and section 4):
- task "cat2dog": source word "cat", target words ["dog"]; the target prompt replaces the first
  occurrence of the source word; if the word is absent, the prompt word most similar to it (by
  text-encoder embedding) is replaced instead;
- token matching for the cross-attention mixup (`match_tokens`).
Where the official code assumes one token per whitespace word (the source word's position = its
word index + 1), we locate words with the tokenizer (`token_span`), which gives the same position
when every word is a single token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from csg_jax.errors import PromptError

_TASK_RE = re.compile(r"[a-z]+(?: [a-z]+)*")
# A "word" is a run of letters: CLIP's pre-tokenizer splits there (spaces, digits, punctuation).
_LETTERS = r"[^\W\d_]"
_WORD_RE = re.compile(rf"{_LETTERS}+")

_TASK_HELP = (
    'A task is "<source word>2<target words>", in lowercase letters and spaces, e.g. '
    '"cat2dog", "zebra2horse" or "dog2dog with glasses".'
)


def parse_task(task: str) -> tuple[str, list[str]]:
    """Split a task name into (source word, target words).

    "cat2dog" -> ("cat", ["dog"]); "dog2dog with glasses" -> ("dog", ["dog", "with", "glasses"]).
    Surrounding / repeated spaces are tolerated and case is folded (CLIP lowercases anyway).
    Raises PromptError unless there is exactly one "2" between a single source word and one or
    more target words made of letters.
    """
    text = " ".join(str(task).lower().split())
    parts = text.split("2")
    if len(parts) != 2:
        raise PromptError(
            f'Task {task!r} must contain exactly one "2" separating the source word from the '
            f'target words (found {len(parts) - 1}). {_TASK_HELP}'
        )
    source, target = (p.strip() for p in parts)
    if not source or not target:
        raise PromptError(f"Task {task!r} has an empty {'source' if not source else 'target'} "
                          f"side. {_TASK_HELP}")
    if not _TASK_RE.fullmatch(source) or " " in source:
        raise PromptError(
            f"The source side {source!r} of task {task!r} must be a single word of letters "
            f"(it names the object to edit, located in the source prompt). {_TASK_HELP}"
        )
    if not _TASK_RE.fullmatch(target):
        raise PromptError(
            f"The target side {target!r} of task {task!r} may only contain letters and spaces. "
            f"{_TASK_HELP}"
        )
    return source, target.split()


def word_matches(prompt: str, word: str) -> list[re.Match]:
    """Every whole-word, case-insensitive occurrence of `word` (may be several words) in
    `prompt`; words are letter runs, any whitespace may separate the words of a phrase."""
    pattern = r"\s+".join(re.escape(w) for w in word.split())
    if not pattern:
        return []
    return list(re.finditer(rf"(?<!{_LETTERS}){pattern}(?!{_LETTERS})", prompt, flags=re.IGNORECASE))


def find_word(prompt: str, word: str) -> re.Match | None:
    """The first of :func:`word_matches`, or None."""
    found = word_matches(prompt, word)
    return found[0] if found else None


def build_target_prompt(
    source_prompt: str,
    task: str,
    similar_word_fn: Callable[[list[str], str], str] | None = None,
) -> tuple[str, str]:
    """Target prompt for `task`: the source prompt with its source word replaced.

    Replaces the first whole-word, case-insensitive occurrence of the task's source word by the
    target words (one space apart). If the source word does not occur and `similar_word_fn` is
    given, it is called as `similar_word_fn(candidate_words, source_word)` with the distinct
    words of the prompt (letter runs, in order) and must return one of them (typically via
    `most_similar_word` with text-encoder embeddings, as the official code does); that word is
    replaced instead. Returns (target_prompt, replaced_word), the replaced word as written in
    `source_prompt` (locate it with `token_span`). Raises PromptError if nothing can be replaced.
    """
    source_word, target_words = parse_task(task)
    match = find_word(source_prompt, source_word)
    if match is None:
        if similar_word_fn is None:
            raise PromptError(
                f"The source word {source_word!r} of task {task!r} does not appear in the source "
                f"prompt {source_prompt!r}. Give the target prompt explicitly (--target-prompt) "
                f"or use a task whose source word is in the prompt."
            )
        candidates = list(dict.fromkeys(w.lower() for w in _WORD_RE.findall(source_prompt)))
        if not candidates:
            raise PromptError(f"The source prompt {source_prompt!r} has no words to replace.")
        chosen = similar_word_fn(candidates, source_word)
        if not isinstance(chosen, str) or chosen.lower() not in candidates:
            raise PromptError(
                f"The similar-word function returned {chosen!r}, which is not a word of the "
                f"source prompt {source_prompt!r} (candidates: {candidates})."
            )
        match = find_word(source_prompt, chosen)
    target_prompt = source_prompt[: match.start()] + " ".join(target_words) + source_prompt[
        match.end():]
    return target_prompt, match.group(0)


def most_similar_word(
    candidates: Sequence[str],
    word: str,
    embed_fn: Callable[[list[str]], np.ndarray],
) -> str:
    """The candidate whose embedding has the highest cosine similarity with `word`'s.

    embed_fn: list of n strings -> (n, d) array (e.g. CLIP pooled text features, as the official
    code uses); called once with `candidates + [word]`. Ties go to the earlier candidate.
    """
    candidates = list(candidates)
    if not candidates:
        raise PromptError(f"No candidate words to compare with {word!r}.")
    emb = np.asarray(embed_fn(candidates + [word]), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(candidates) + 1:
        raise ValueError(
            f"embed_fn must return an (n, d) array for n={len(candidates) + 1} strings, "
            f"got shape {emb.shape}"
        )
    return candidates[int(np.argmax(_cosine(emb[:-1], emb[-1])))]


def _cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity of each row of a (n, d) with b (d,) -> (n,)."""
    return a @ b / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b), eps)


def _ids(tokenizer, text):
    """Token ids without BOS/EOS. `text`: a string -> list[int], or a list -> list[list[int]]."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_span(tokenizer, prompt: str, word: str) -> tuple[int, int]:
    """Token positions [start, end) of the first whole-word occurrence of `word` in `prompt`.

    Positions index the encoded prompt with BOS at position 0 (= rows of the text encoder's
    output states). Found by tokenizing the text before the word and the word itself (CLIP's
    BPE never merges across the word boundary, so the counts add up); a word that BPE splits
    into k tokens gives end - start = k. `word` may be a phrase ("dog with glasses").
    Raises PromptError if the word is absent or falls outside the tokenizer's max length.
    """
    match = find_word(prompt, word)
    if match is None:
        raise PromptError(f"The word {word!r} does not appear in the prompt {prompt!r}.")
    prefix_ids, word_ids = _ids(tokenizer, [prompt[: match.start()], match.group(0)])
    start = 1 + len(prefix_ids)
    end = start + len(word_ids)
    full = _ids(tokenizer, prompt)
    if full[start - 1 : end - 1] != word_ids:  # e.g. a tokenizer that merges across spaces
        raise PromptError(
            f"Could not locate {word!r} in the tokenized prompt {prompt!r}: its tokens differ "
            f"in context. Rephrase the prompt so that the word stands alone."
        )
    max_len = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_len, int) and end > max_len - 1:
        raise PromptError(
            f"The word {word!r} sits at token positions {start}..{end - 1} of the prompt "
            f"{prompt!r}, beyond the {max_len - 2} tokens the text encoder sees. Shorten the "
            f"prompt or move the word forward."
        )
    return start, end


def check_length(tokenizer, prompt: str, max_length: int = 77) -> tuple[str, str | None]:
    """(prompt, None) if it fits the text encoder, else (truncated prompt, warning message).

    The encoder sees max_length tokens including BOS and EOS, i.e. max_length - 2 prompt
    tokens. A too-long prompt is cut after the last whole whitespace-separated chunk that
    still fits (so the returned text tokenizes to at most max_length - 2 tokens and keeps the
    original spelling); only if the first chunk alone is too long are tokens decoded instead.
    The warning says how many tokens were dropped and which text.
    """
    budget = max_length - 2
    n_total = len(_ids(tokenizer, prompt))
    if n_total <= budget:
        return prompt, None
    chunks = list(re.finditer(r"\S+", prompt))
    # CLIP's pre-tokenizer never puts whitespace inside a token: counts add up over chunks.
    counts = [len(ids) for ids in _ids(tokenizer, [m.group(0) for m in chunks])]
    used, end = 0, 0
    for m, k in zip(chunks, counts):
        if used + k > budget:
            break
        used, end = used + k, m.end()
    if end > 0:
        truncated = prompt[:end]
    else:
        truncated = tokenizer.decode(_ids(tokenizer, prompt)[:budget])
    n_kept = len(_ids(tokenizer, truncated))
    dropped_text = prompt[end:].strip() if end > 0 else prompt
    warning = (
        f"The prompt is {n_total} tokens long but the text encoder reads at most {budget}; "
        f"dropped the last {n_total - n_kept} tokens ({dropped_text!r}). Using: {truncated!r}"
    )
    return truncated, warning


def match_tokens(
    source_states: np.ndarray,
    target_states: np.ndarray,
    n_source_words: int,
    n_target_words: int,
    forced: tuple[tuple[int, int], int] | None = None,
) -> np.ndarray:
    """Official CSG token matching for the cross-attention mixup (csg-reference.md, section 4).

    source_states, target_states: (T, d) final text-encoder states of the source and target
    prompts (T = 77 for SD, BOS at row 0). For each target position p in 1..n_target_words,
    choose the source position in 0..n_source_words (BOS included) whose state has the highest
    cosine similarity with target row p (earliest position on ties). Then, if `forced` =
    ((start, end), source_position), the target word's positions start..end-1 are set to the
    source word's position (the edited word reads the reference map of the word it replaces).
    The official code counts whitespace words for n_*; pass token counts to cover prompts with
    multi-token words. Ranges are clipped to the T rows.

    Returns source_index_for_target: (T,) int32, the source column whose reference map the
    mixup uses for each target column: matched positions as computed, p -> p elsewhere.
    """
    src = np.asarray(source_states, dtype=np.float64)
    tgt = np.asarray(target_states, dtype=np.float64)
    if src.ndim != 2 or src.shape != tgt.shape:
        raise ValueError(f"expected two (T, d) arrays of one shape, got {src.shape}, {tgt.shape}")
    T = tgt.shape[0]
    index = np.arange(T, dtype=np.int32)
    candidates = src[: min(n_source_words, T - 1) + 1]
    for p in range(1, min(n_target_words, T - 1) + 1):
        index[p] = int(np.argmax(_cosine(candidates, tgt[p])))
    if forced is not None:
        (start, end), source_position = forced
        if not (0 <= start < end <= T and 0 <= source_position < T):
            raise ValueError(f"forced={forced} is outside the {T} token positions")
        index[start:end] = source_position
    return index
