"""Prompt-to-Prompt as Google released it (issue: baselines held to their official code).

Expected values are closed forms worked out by hand from the released code's rules, or a small
NumPy re-implementation of the released controller written here (LocalBlend on recorded maps,
``AttentionReplace`` / ``AttentionRefine`` / ``AttentionReweight`` on probabilities). The released
code itself runs only in ``scripts/parity_p2p.py`` (outside CI, its own venv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.editing import core, p2p, p2p_align
from csg_jax.editing.config import EditConfig
from csg_jax.editing.editor import batch_prompts, get_editor, plan_prompts
from csg_jax.errors import ConfigError
from csg_jax.models.attention import blend_probs
from csg_jax.models.unet import UNetConfig, attention_layers

T = 77


@pytest.fixture(scope="module")
def tok(tiny_sd1):
    return tiny_sd1.tokenizer


# --- token alignment (seq_aligner / get_word_inds) ---------------------------------------------

def test_word_token_indices_count_every_occurrence(tok):
    text = "a photo of a cat and a cat"  # BOS a photo of a cat and a cat EOS: one token per word
    assert p2p_align.word_token_indices(tok, text, "cat") == [5, 8]
    assert p2p_align.word_token_indices(tok, text, "a") == [1, 4, 7]
    assert p2p_align.word_token_indices(tok, text, 2) == [3]
    assert p2p_align.word_token_indices(tok, text, "dog") == []
    # "zzz" is not in the tiny vocabulary: three tokens z z z</w>
    assert p2p_align.word_token_indices(tok, "a photo of a zzz on", "zzz") == [5, 6, 7]
    assert p2p_align.word_token_indices(tok, "a photo of a zzz on", "on") == [8]


def test_word_swap_matrix_one_to_one_and_one_to_many(tok):
    same = p2p_align.align(tok, "a photo of a cat", "a photo of a dog")
    assert same.mode == "replace"
    np.testing.assert_array_equal(same.matrix, np.eye(T))  # dog's column reads cat's: same position
    np.testing.assert_array_equal(same.keep, 0)

    many = p2p_align.align(tok, "a photo of a cat", "a photo of a zzz")  # 1 source token -> 3 target tokens
    want = np.zeros((T, T), np.float32)
    want[range(5), range(5)] = 1  # BOS a photo of a
    want[5, 5:8] = 1 / 3  # each z reads cat's map / 3 (the released 'ratio')
    want[range(8, T), range(8, T)] = 1  # after the last swap: M[j, j] on the target index
    np.testing.assert_allclose(many.matrix, want)


def test_refinement_aligns_tokens_and_keeps_new_words_own_attention(tok):
    a = p2p_align.align(tok, "a photo of a cat", "a photo of a big cat")
    assert a.mode == "refine"
    # x: BOS a photo of a cat EOS; y: BOS a photo of a big cat EOS; "big" (5) is new
    mapper = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6}
    want = np.zeros((T, T), np.float32)
    for t, s in mapper.items():
        want[s, t] = 1
    want[range(8, T), range(8, T)] = 1  # beyond the target's tokens: identity
    np.testing.assert_array_equal(a.matrix, want)
    np.testing.assert_array_equal(np.flatnonzero(a.keep), [5])


def test_batch_prompts_carry_the_alignment_and_blend_columns(tiny_sd1):
    plan = plan_prompts(tiny_sd1, "a cat on a cat mat", target_prompt="a dog on a cat mat")
    p = batch_prompts(tiny_sd1, [plan])
    np.testing.assert_array_equal(np.asarray(p.p2p_matrix[0]), np.eye(T))
    blend = np.asarray(p.blend_columns[0])
    assert np.flatnonzero(blend[0]).tolist() == [2, 5]  # every "cat" of the source prompt (get_word_inds)
    assert np.flatnonzero(blend[1]).tolist() == [2]  # "dog"
    sim = batch_prompts(tiny_sd1, [plan], token_alignment="similarity")
    ref = np.asarray(sim.ref_columns[0])
    np.testing.assert_array_equal(np.asarray(sim.p2p_matrix[0]), np.eye(T)[ref].T)


# --- controller maths: numpy re-implementation of the released formulas ------------------------

def released_cross(base, own, mode, matrix, mapper, alphas, equalizer, alpha_t):
    """attn_replace_new of AttentionControlEdit.forward for one edited prompt: (N, Q, T) arrays."""
    if mode == "replace":
        replaced = np.einsum("hpw,wn->hpn", base, matrix)
    else:
        replaced = base[:, :, mapper] * alphas + own * (1 - alphas)
    replaced = replaced * equalizer  # AttentionReweight on top of the previous controller
    return replaced * alpha_t + (1 - alpha_t) * own


@pytest.mark.parametrize("target", ["a photo of a zzz", "a photo of a big cat"])
def test_blend_probs_is_the_released_cross_replacement(tok, target):
    rng = np.random.RandomState(0)
    base, own = rng.dirichlet(np.ones(T), (2, 3, 16)).astype(np.float32)  # (N=3, Q=16, T) each
    a = p2p_align.align(tok, "a photo of a cat", target)
    mapper, alphas = p2p_align.refinement_alignment(tok, "a photo of a cat", target)
    equalizer = np.ones(T, np.float32)
    equalizer[5] = 2.5
    for alpha_t in (0.0, 1.0):  # after / during the cross-replacement steps
        want = released_cross(base, own, a.mode, a.matrix, mapper, alphas, equalizer, alpha_t)
        got = blend_probs(jnp.asarray(own[None]), jnp.asarray(base[None]), jnp.full((1, 16), 1 - alpha_t),
                          ref_scale=jnp.asarray(equalizer[None]), ref_matrix=jnp.asarray(a.matrix[None]),
                          keep=jnp.asarray((a.keep * equalizer)[None]))
        np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-6, atol=1e-7)


# --- which layers (released absolute pixel counts) ---------------------------------------------

def _names(layers):
    return sorted(l.name for l in layers)


def _attn(block, count, kind):
    return [f"{block}.attentions.{a}.transformer_blocks.0.{kind}" for a in range(count)]


SD = UNetConfig()  # SD 1.x: 64 x 64 latents at 512 px


@pytest.mark.parametrize("latent, rule, blocks", [
    (64, "null-text", ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]),  # <= 32^2
    (64, "stable", ["down_blocks.2", "mid_block", "up_blocks.1"]),  # <= 16^2
    (64, "scaled", ["down_blocks.2", "mid_block", "up_blocks.1"]),  # <= (64/4)^2
    (32, "null-text", ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2",
                       "up_blocks.3"]),
    (32, "stable", ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]),  # 256 px: 16x16 too
    (32, "scaled", ["down_blocks.2", "mid_block", "up_blocks.1"]),
    (96, "null-text", ["down_blocks.2", "mid_block", "up_blocks.1"]),  # 768 px: 24x24 and 12x12
    (96, "stable", ["mid_block"]),
    (96, "scaled", ["down_blocks.2", "mid_block", "up_blocks.1"]),
])
def test_self_attention_replacement_layers(latent, rule, blocks):
    mask = core.plan_layers(SD, (latent, latent), latent // 4)
    plan = p2p.plan_layers(SD, (latent, latent), mask, EditConfig(method="p2p", self_replace_layers=rule))
    counts = {"mid_block": 1, "down_blocks": 2, "up_blocks": 3}
    want = [n for b in blocks for n in _attn(b, counts[b.split(".")[0]], "attn1")]
    assert _names(plan.self_replaced) == sorted(want)


def test_released_blend_layers_are_down_2_4_and_up_0_3_of_the_stored_cross_layers():
    at = lambda latent: p2p.plan_layers(SD, (latent, latent), core.plan_layers(SD, (latent, latent), 16),
                                        EditConfig(method="p2p", local_blend=True))
    plan = at(64)  # 512 px: exactly the five 16x16 layers, never the mid block
    assert _names(plan.blend) == sorted(_attn("down_blocks.2", 2, "attn2") + _attn("up_blocks.1", 3, "attn2"))
    assert plan.blend_hw == (16, 16) and plan.blend_released
    plan = at(32)  # 256 px: the 16x16 down layers and the 8x8 up layers (read as 16x16 blocks)
    assert _names(plan.blend) == sorted(_attn("down_blocks.1", 2, "attn2") + _attn("up_blocks.1", 3, "attn2"))
    old = p2p.plan_layers(SD, (32, 32), core.plan_layers(SD, (32, 32), 8), EditConfig(method="p2p", blend_layers="resolution"))
    assert {l.resolution for l in old.blend} == {(8, 8)} and not old.blend_released


def test_released_blend_layers_that_the_released_code_cannot_read_are_a_config_error(tiny_sd1):
    cfg = tiny_sd1.unet.config  # at 8x8 latents the first up layers have 4 heads x 4x4 pixels: not 256-divisible
    mask = core.plan_layers(cfg, (8, 8), 2)
    with pytest.raises(ConfigError, match="blend_layers='resolution'"):
        p2p.plan_layers(cfg, (8, 8), mask, EditConfig(method="p2p", local_blend=True))
    p2p.plan_layers(cfg, (8, 8), mask, EditConfig(method="p2p"))  # no LocalBlend: no error
    p2p.plan_layers(cfg, (8, 8), mask, EditConfig(method="p2p", local_blend=True, blend_layers="resolution"))


# --- LocalBlend on recorded maps: numpy re-implementation of the released class ----------------

def released_local_blend(store, alpha, x_t, threshold, start, step):
    """The null-text notebook's LocalBlend.__call__ at 0-based ``step`` on running-sum maps.

    store: list of (2 * N, Q, T) summed maps of the selected layers (rows: source heads, target
    heads); alpha: (2, T) word columns; x_t: (2, C, h, w)."""
    if not step + 1 > start:  # its counter is incremented before the test
        return x_t
    maps = np.concatenate([m.reshape(2, -1, 1, 16, 16, T) for m in store], axis=1)
    maps = (maps * alpha[:, None, None, None, None, :]).sum(-1).mean(1)  # (2, 1, 16, 16)
    padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max([padded[:, :, i:i + 16, j:j + 16] for i in range(3) for j in range(3)], axis=0)
    h, w = x_t.shape[2:]
    rows, cols = (np.arange(h) * 16 // h), (np.arange(w) * 16 // w)  # torch "nearest": floor(dst * in / out)
    mask = pooled[:, :, rows][:, :, :, cols]
    mask = mask / mask.max(axis=(2, 3), keepdims=True)
    mask = mask > threshold
    mask = (mask[:1] | mask).astype(np.float32)
    return x_t[:1] + mask * (x_t - x_t[:1])


def test_local_blend_on_recorded_maps_is_the_released_one(tiny_sd1):
    cfg = tiny_sd1.unet.config  # 32x32 latents: stored cross layers down 32^2, 16^2; up 16^2 x2, 32^2 x2
    latent = (32, 32)
    plan = p2p.plan_layers(cfg, latent, core.plan_layers(cfg, latent, 8), EditConfig(method="p2p", local_blend=True))
    assert [l.resolution for l in plan.blend] == [(16, 16), (16, 16), (32, 32)]  # up[:3]; down[2:4] is empty
    rng = np.random.RandomState(1)
    alpha = np.zeros((2, T), np.float32)
    alpha[0, 5], alpha[1, [5, 6]] = 1, 1
    steps, start, threshold = 4, 1, 0.7
    store = None
    x_src = rng.standard_normal((4, *latent)).astype(np.float32)
    word_sum = jnp.zeros((1, 2, 16, 16))
    for step in range(steps):
        rec, flat = {}, []
        for l in plan.blend:
            q = l.resolution[0] * l.resolution[1]
            probs = rng.dirichlet(np.ones(T) * 0.3, (2, l.heads, q)).astype(np.float32)  # (rows, N, Q, T)
            probs[..., 5] *= np.linspace(0.0, 4.0, q, dtype=np.float32)  # the words' maps grow down the image
            rec[l.name] = jnp.asarray(probs[:, None])  # (2, B=1, N, Q, T)
            flat.append(probs.reshape(2 * l.heads, q, T))
        store = flat if store is None else [a + b for a, b in zip(store, flat)]
        word_sum = word_sum + p2p.word_maps(rec, plan, jnp.asarray(alpha[None]))
        x_t = np.stack([x_src, x_src + rng.standard_normal(x_src.shape).astype(np.float32)])
        want = released_local_blend(store, alpha, x_t, threshold, start, step)
        m = np.asarray(p2p.blend_mask(word_sum, latent, threshold))[0]
        got = x_t[1] if step < start else x_t[0] + m * (x_t[1] - x_t[0])
        np.testing.assert_allclose(got, want[1], rtol=0, atol=1e-6)
        assert 0 < m.mean() < 1 or step < start, "the threshold must mask part of the image"


# --- end to end on the tiny model ----------------------------------------------------------------

def test_released_blend_maps_read_the_source_word_during_replacement(tiny_sd1):
    """The released store holds the attention *after* the in-place replacement: with every step
    replaced and a one-token word swap, the target word's LocalBlend map is the source word's."""
    x_T = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4))
    plan = plan_prompts(tiny_sd1, "a photo of a dog on the grass", task="dog2cat", negative="empty")
    prompts = batch_prompts(tiny_sd1, [plan])
    out = {}
    for maps in ("released", "own"):
        config = EditConfig(method="p2p", num_steps=3, local_blend=True, blend_maps=maps, cross_replace_steps=1.0,
                            blend_threshold=0.9)
        out[maps] = np.asarray(get_editor(tiny_sd1, config, (16, 16)).edit(x_T, prompts, config)["word_maps"])[0]
    np.testing.assert_allclose(out["released"][1], out["released"][0], rtol=1e-5)
    np.testing.assert_allclose(out["own"][0], out["released"][0], rtol=1e-5)  # source rows untouched
    assert np.abs(out["own"][1] - out["own"][0]).max() > 1e-3 * np.abs(out["own"][0]).max()
