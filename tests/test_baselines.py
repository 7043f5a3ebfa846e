"""The baselines in the CSG engine: Prompt-to-Prompt, Pix2Pix-Zero, null-text inversion.

Specification tests on the tiny SD-1 model (32x32 images, 16x16 latents, 3 DDIM steps).
Compilation dominates, so each program is compiled once per module and shared: the Editors for
"ddim", "p2p" and "pix2pix-zero" (their float knobs are arrays: sweeping them must not
recompile), a null-text Editor, one value-and-gradient of the Pix2Pix-Zero loss, and two CLI runs
in subprocesses (p2p with LocalBlend, pix2pix-zero with sentence files and the regularised
inversion).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.editing import core, costs, p2p, pix2pix_zero
from csg_jax.editing.config import EditConfig
from csg_jax.editing.editor import batch_prompts, get_editor, plan_prompts, to_model_range, translate_image
from csg_jax.errors import ConfigError
from csg_jax.models.attention import AttentionControl
from csg_jax.models.unet import attention_layers
from csg_jax.model_zoo import demo_image

PROMPT = "a photo of a dog on the grass"
TASK = "dog2cat"
N = 3
LATENT_HW = (16, 16)
TOL = 1e-4  # two compiled programs of the same maths (explicit vs fused attention), relative to |latent|


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


# --- shared, expensive objects -------------------------------------------------------------

@pytest.fixture(scope="module")
def plans(pipe):
    return {neg: plan_prompts(pipe, PROMPT, task=TASK, negative=neg) for neg in ("source", "empty")}


@pytest.fixture(scope="module")
def prompts(pipe, plans):
    return {neg: batch_prompts(pipe, [plan]) for neg, plan in plans.items()}


def identity_edit(p: core.Prompts) -> core.Prompts:
    """Target prompt = source prompt (same shapes: 'dog' and 'cat' are one token each)."""
    ident = jnp.broadcast_to(jnp.arange(p.ref_columns.shape[1], dtype=jnp.int32), p.ref_columns.shape)
    source_word = np.zeros(p.target_weights.shape, np.float32)
    np.put_along_axis(source_word, np.asarray(p.source_columns), np.asarray(p.source_weights), axis=1)
    return p._replace(target=p.source, ref_columns=ident, target_weights=jnp.asarray(source_word))


class Run:
    """An Editor for one static config; ``run(prompts, **knobs)`` -> numpy outputs."""

    def __init__(self, pipe, x_T, **static):
        self.config = EditConfig(num_steps=N, **static)
        self.editor = get_editor(pipe, self.config, LATENT_HW)
        self.x_T = x_T

    def __call__(self, prompts, uncond=None, **knobs):
        out = self.editor.edit(self.x_T, prompts, self.config.replace(**knobs), uncond)
        return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def ddim(pipe, x_T):
    return Run(pipe, x_T, method="ddim")


@pytest.fixture(scope="module")
def prompt_to_prompt(pipe, x_T):
    return Run(pipe, x_T, method="p2p")


@pytest.fixture(scope="module")
def zero(pipe, x_T):
    return Run(pipe, x_T, method="pix2pix-zero")


# --- config, costs ----------------------------------------------------------------------------

def test_baseline_settings_are_validated():
    for bad in (dict(cross_replace_steps=1.5), dict(self_replace_steps=-0.1), dict(blend_threshold=2.0),
                dict(equalizer_scale=-1.0), dict(xa_guidance=-0.1), dict(source_sentences="a.txt"),
                dict(null_text_steps=0), dict(method="p2p-zero"), dict(inversion="null")):
        with pytest.raises(ConfigError):
            EditConfig(**bad)
    assert EditConfig.from_dict({"local-blend": "true", "method": "p2p", "xa_guidance": "0.2"}).local_blend is True


def test_p2p_defaults_are_its_own_and_the_paper_setting_is_the_shared_default():
    own = EditConfig.for_method("p2p")
    assert (own.guidance_scale, own.negative_prompt, own.cross_replace_steps, own.self_replace_steps) == (7.5, "empty", 0.8, 0.4)
    assert EditConfig.from_yaml("configs/p2p.yaml") == own
    paper = EditConfig(method="p2p")
    assert (paper.guidance_scale, paper.negative_prompt) == (5.0, "source")
    assert EditConfig.from_yaml("configs/pix2pix-zero-paper.yaml") == EditConfig(method="pix2pix-zero")
    zero = EditConfig.for_method("pix2pix-zero")  # released: its inversion schedule and regularised noise
    assert (zero.inversion, zero.noise_regularization) == ("official", True)
    assert EditConfig.from_yaml("configs/pix2pix-zero.yaml") == zero


def test_unet_evaluation_counts():
    per = lambda **kw: costs.unet_evaluations_per_step(EditConfig(**kw))
    assert per(method="p2p") == {"inversion": 1, "source": 2, "target": 2}
    # reference maps 1 + gradient on both halves 2 x (1 forward + 2 for the backward) + edited prediction 2
    assert per(method="pix2pix-zero") == {"inversion": 1, "source": 1, "target": 9}
    assert per(method="csg")["target"] == 5
    nt = per(method="ddim", inversion="null-text")
    assert nt["source"] == 2 and nt["null_text"] == 2 + 3 * 10
    assert costs.unet_evaluations(EditConfig(method="pix2pix-zero", num_steps=10)) == 10 * (1 + 1 + 9)
    # where x_T comes from: an inversion file runs no inversion (nor null-text); a generated source
    # runs none and samples with CFG (2 evaluations); N = 10
    total = lambda source, **kw: costs.unet_evaluations(EditConfig(num_steps=10, **kw), source=source)
    assert total("image", method="csg") == 10 + 10 * (1 + 5)
    assert total("inverted", method="csg") == 10 * (1 + 5)
    assert total("generated", method="csg") == 10 * (2 + 5)
    assert total("inverted", method="csg", inversion="null-text") == 10 * (2 + 5)
    assert total("generated", method="pix2pix-zero") == 10 * (2 + 2 + 6 + 2)
    assert total("generated", method="p2p") == 10 * (2 + 2)
    with pytest.raises(ValueError, match="source"):
        total("photo", method="csg")


def test_p2p_step_counts_follow_p2p_rounding():
    k = p2p.Knobs.from_config(EditConfig(method="p2p", num_steps=50))
    assert (int(k.cross_steps), int(k.self_steps), int(k.blend_start)) == (40, 20, 10)
    assert int(p2p.Knobs.from_config(EditConfig(num_steps=10, self_replace_steps=0.7)).self_steps) == 7


def test_p2p_layers_scale_with_the_latent(pipe):
    scaled = EditConfig(method="p2p", self_replace_layers="scaled", blend_layers="resolution")
    plan = p2p.plan_layers(pipe.unet.config, LATENT_HW, core.plan_layers(pipe.unet.config, LATENT_HW, 4), scaled)
    assert plan.blend and all(l.resolution == (4, 4) for l in plan.blend)  # 16x16 of 64x64 -> 4x4 of 16x16
    assert plan.self_replaced and all(l.resolution[0] * l.resolution[1] <= 16 for l in plan.self_replaced)
    assert {l.name for l in plan.cross} == {l.name for l in attention_layers(pipe.unet.config, LATENT_HW) if l.kind == "cross"}


def test_local_blend_mask_pools_normalises_thresholds_and_unites():
    maps = np.zeros((1, 2, 4, 4), np.float32)
    maps[0, 0, 0, 0] = 1.0  # source word: top-left corner
    maps[0, 1, 3, 3] = 2.0  # target words: bottom-right corner (own max)
    maps[0, 1, 0, 3] = 0.5  # below 0.3 after pooling? no: 0.5 / 2 = 0.25 < 0.3
    m = np.asarray(p2p.blend_mask(jnp.asarray(maps), (8, 8), 0.3))[0]
    want = np.zeros((4, 4))
    want[:2, :2] = 1  # 3x3 max pool spreads each peak by one pixel
    want[2:, 2:] = 1
    np.testing.assert_array_equal(m, np.kron(want, np.ones((2, 2))))  # nearest resize 4 -> 8


def test_equalizer_columns_mark_the_target_words_or_the_named_ones(pipe, plans, prompts):
    plan = plans["source"]  # "a photo of a cat on the grass": BOS a photo of a cat on the grass
    marked = lambda p: np.flatnonzero(np.asarray(p.reweight_columns[0])).tolist()
    assert marked(prompts["source"]) == list(range(*plan.target_span)) == [5]
    assert np.flatnonzero(np.asarray(prompts["source"].target_weights[0])).tolist() == [5]
    longer = batch_prompts(pipe, [plan_prompts(pipe, PROMPT, task="dog2dog with glasses")])
    assert longer.target_weights.shape == prompts["source"].target_weights.shape  # one program for any length
    np.testing.assert_allclose(np.asarray(longer.target_weights[0, 5:8]), 1 / 3)
    assert marked(batch_prompts(pipe, [plan], equalizer_words="grass photo")) == [2, 8]
    with pytest.raises(Exception, match="does not appear"):
        batch_prompts(pipe, [plan], equalizer_words="horse")


# --- Prompt-to-Prompt -------------------------------------------------------------------------

def test_p2p_without_replacement_is_ddim_editing(prompt_to_prompt, ddim, prompts):
    """cross_replace_steps = self_replace_steps = 0 and no blend: the target branch is plain CFG
    DDIM from x_T (guidance 7.5, empty negative: the two CFG halves differ)."""
    p = prompts["empty"]
    out = prompt_to_prompt(p, cross_replace_steps=0.0, self_replace_steps=0.0, guidance_scale=7.5)
    ref = ddim(p, guidance_scale=7.5)
    assert _rel(out["edited"], ref["edited"]) < TOL


def test_p2p_identity_edit_reproduces_the_reconstruction(prompt_to_prompt, ddim, prompts):
    """Target = source: the target rows equal the source rows, so the edit is P2P's own
    reconstruction (its source branch) whatever the replacement. With the source prompt as
    negative that branch is plain conditional DDIM from x_T, i.e. exactly CSG's source pass (the
    reconstruction of every other method); with the empty negative at 7.5 it is CFG sampling,
    comparable only with P2P's own reconstruction output."""
    for neg, g in (("source", 5.0), ("empty", 7.5)):
        out = prompt_to_prompt(identity_edit(prompts[neg]), guidance_scale=g)
        assert _rel(out["edited"], out["reconstruction"]) < 1e-5, neg
    src = prompt_to_prompt(identity_edit(prompts["source"]))
    assert _rel(src["reconstruction"], ddim(prompts["source"])["reconstruction"]) < TOL


def test_p2p_replacement_pulls_the_edit_toward_the_source_without_recompiling(prompt_to_prompt, ddim, prompts):
    p = prompts["source"]
    traces = prompt_to_prompt.editor.trace_counts["edit"]
    plain = prompt_to_prompt(p, cross_replace_steps=0.0, self_replace_steps=0.0)
    default = prompt_to_prompt(p)
    reweighted = prompt_to_prompt(p, equalizer_scale=3.0)
    assert prompt_to_prompt.editor.trace_counts["edit"] == traces, "P2P knobs are arrays: no recompilation"
    recon = default["reconstruction"]
    dist = lambda a: float(np.abs(a - recon).mean())
    assert dist(default["edited"]) < 0.8 * dist(plain["edited"])
    assert _rel(reweighted["edited"], default["edited"]) > 1e-3
    # the masks: mask_raw is the source word's cross-attention (CSG's per-step mask, averaged)
    np.testing.assert_allclose(default["mask_raw"], ddim(p)["mask_raw"], atol=1e-4)
    np.testing.assert_array_equal(default["mask"], default["mask_raw"])  # no LocalBlend


# --- Pix2Pix-Zero -----------------------------------------------------------------------------

def test_pix2pix_zero_without_guidance_and_direction_is_the_ddim_reconstruction(zero, prompts):
    p = prompts["source"]
    out = zero(p._replace(target=p.source), xa_guidance=0.0)  # zero edit direction
    assert _rel(out["edited"], out["reconstruction"]) < TOL
    # with a direction the maps drift from the reference and the guidance (0.1) moves the latent
    unguided, guided = zero(p, xa_guidance=0.0), zero(p)
    assert _rel(guided["edited"], unguided["edited"]) > 1e-4
    assert zero.editor.trace_counts["edit"] == 1


def test_pix2pix_zero_edit_direction_defaults_to_the_prompt_difference(pipe, prompts, tmp_path):
    p = prompts["source"]
    assert pix2pix_zero.edit_context(pipe, p, EditConfig(method="pix2pix-zero")) is p
    src, tgt = tmp_path / "dog.txt", tmp_path / "cat.txt"
    src.write_text("a dog\n\na photo of a dog\n")
    tgt.write_text("a cat\na photo of a cat\n")
    cfg = EditConfig(method="pix2pix-zero", source_sentences=str(src), target_sentences=str(tgt))
    edited = pix2pix_zero.edit_context(pipe, p, cfg)
    states = np.asarray(pipe.embed(["a dog", "a photo of a dog", "a cat", "a photo of a cat"]))
    direction = states[2:].mean(0) - states[:2].mean(0)
    np.testing.assert_allclose(np.asarray(edited.target[0]), np.asarray(p.source[0]) + direction, atol=1e-5)


def test_pix2pix_zero_gradient_matches_finite_differences(pipe, x_T, prompts):
    """jax.grad of the cross-attention loss through the UNet vs a central difference along a
    direction mixing the gradient with noise (float32: relative tolerance 2e-2)."""
    p = prompts["source"]
    layers = core.plan_layers(pipe.unet.config, LATENT_HW, 4)
    names = tuple(l.name for l in layers.cross_layers)
    t = jnp.asarray(501, jnp.int32)
    record = AttentionControl(record=tuple((n, "probs") for n in names))
    _, ref = jax.jit(lambda x: pipe.unet.apply({"params": pipe.params["unet"]}, x, t, p.source, record))(x_T)
    ref = {k: jnp.concatenate([v, v]) for k, v in ref.items()}
    ctx = jnp.concatenate([p.negative, p.target])
    x_pair = jnp.concatenate([x_T, x_T]) + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (2, *LATENT_HW, 4))
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda x: pix2pix_zero.cross_attention_loss(pipe, pipe.params, x, t, ctx, ref, names)))
    loss, grad = value_and_grad(x_pair)
    assert float(loss) > 0 and float(jnp.abs(grad).max()) > 0
    noise = jax.random.normal(jax.random.PRNGKey(2), grad.shape)
    v = grad / jnp.linalg.norm(grad) + noise / jnp.linalg.norm(noise)
    v = v / jnp.linalg.norm(v)
    h = 1e-2
    fd = (float(value_and_grad(x_pair + h * v)[0]) - float(value_and_grad(x_pair - h * v)[0])) / (2 * h)
    np.testing.assert_allclose(fd, float(jnp.vdot(grad, v)), rtol=2e-2)
    # a small SGD step lowers the loss (the official 0.1 overshoots on this sharpened tiny model)
    assert float(value_and_grad(x_pair - 0.01 * grad)[0]) < float(loss)


def test_noise_regularization_decorrelates_and_normalises():
    key = jax.random.PRNGKey(3)
    white = jax.random.normal(key, (1, 16, 16, 4))
    smooth = 1.5 * (white + jnp.roll(white, 1, axis=1) + jnp.roll(white, 1, axis=2)) / np.sqrt(3) + 0.3
    out = jax.jit(pix2pix_zero.regularize_noise)(smooth, jax.random.PRNGKey(0))
    shifts = jnp.ones((len(pix2pix_zero.pyramid_sizes(16)), 4), jnp.int32)
    ac = lambda e: float(pix2pix_zero.auto_correlation_loss(e[0], shifts))
    kl = lambda e: float(pix2pix_zero.kl_divergence(e[0]))
    assert ac(out) < 0.5 * ac(smooth) and kl(out) < 0.5 * kl(smooth)


# --- null-text inversion ----------------------------------------------------------------------

def test_null_text_inversion_reconstructs_better_than_ddim_inversion(pipe):
    """At guidance 7.5 with the empty negative prompt, CFG sampling from the plain DDIM inversion
    drifts; with the per-step null embeddings the same source pass lands much closer to x0."""
    config = EditConfig(method="ddim", num_steps=N, guidance_scale=7.5, negative_prompt="empty", inversion="null-text")
    image = demo_image(32)
    result = translate_image(pipe, image, PROMPT, task=TASK, config=config)
    assert result.null_embeddings.shape == (N, 77, pipe.unet.config.cross_attention_dim)
    assert 1 <= result.null_text_iterations.min() and result.null_text_iterations.max() <= 10
    editor = get_editor(pipe, config, LATENT_HW)
    x0 = np.asarray(editor.encode(jnp.asarray(to_model_range(image)[None])))[0]
    p = batch_prompts(pipe, [result.plan])
    x_T = jnp.asarray(result.inverted[None])
    fixed = jnp.broadcast_to(p.negative, (N, *p.negative.shape))  # plain CFG: the empty prompt every step
    plain = np.asarray(editor.edit(x_T, p, config, fixed)["reconstruction"][0])
    err = lambda r: float(np.mean((r - x0) ** 2))
    assert err(result.reconstruction_latent) < 0.5 * err(plain)
    assert editor.trace_counts["edit"] == 1 and editor.trace_counts["null_text"] == 1


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_flags_select_methods_and_their_defaults():
    from csg_jax.translate import build_parser, edit_config_from_args

    config = lambda *argv: edit_config_from_args(build_parser().parse_args(["--demo", *argv]))
    c = config("--method", "p2p", "--null-text", "--local-blend", "--equalizer-words", "cat", "--equalizer-scale", "2")
    assert (c.method, c.inversion, c.guidance_scale, c.negative_prompt) == ("p2p", "null-text", 7.5, "empty")
    assert (c.local_blend, c.equalizer_words, c.equalizer_scale) == (True, "cat", 2.0)
    c = config("--config", "configs/p2p-paper.yaml", "--cross-replace-steps", "0.5")
    assert (c.guidance_scale, c.negative_prompt, c.cross_replace_steps) == (5.0, "source", 0.5)
    c = config("--method", "pix2pix-zero", "--xa-guidance", "0.2", "--inversion-variant", "null-text", "--null-text-steps", "3")
    assert (c.method, c.xa_guidance, c.inversion, c.null_text_steps, c.guidance_scale) == ("pix2pix-zero", 0.2, "null-text", 3, 5.0)
    assert config().method == "csg" and config().guidance_scale == 5.0
    c = config("--method", "p2p")  # the released behaviour unless an option names another
    assert (c.self_replace_layers, c.blend_layers, c.blend_maps, c.token_alignment, c.blend_start) == (
        "null-text", "released", "released", "released", 0.2)
    c = config("--method", "p2p", "--self-replace-layers", "stable", "--blend-layers", "resolution", "--blend-maps", "own",
               "--token-alignment", "similarity", "--blend-start", "0")
    assert (c.self_replace_layers, c.blend_layers, c.blend_maps, c.token_alignment, c.blend_start) == (
        "stable", "resolution", "own", "similarity", 0.0)
    c = config("--method", "pix2pix-zero")
    assert (c.inversion, c.noise_regularization) == ("official", True)
    assert config("--method", "pix2pix-zero", "--no-noise-regularization").noise_regularization is False
    with pytest.raises(Exception, match="blend_layers"):
        EditConfig(method="p2p", blend_layers="16x16")


def _cli(tiny_sd1_dir, out, *flags):
    cmd = [sys.executable, "-m", "csg_jax.translate", "--demo", "--model", tiny_sd1_dir, "--steps", str(N),
           "--quiet", "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "meta.json") as f:
        return json.load(f)


def test_cli_p2p_with_local_blend(tiny_sd1_dir, tmp_path):
    out = tmp_path / "p2p"
    meta = _cli(tiny_sd1_dir, out, "--method", "p2p", "--local-blend", "--blend-threshold", "0.9", "--save-latents")
    s = meta["settings"]
    assert (s["method"], s["guidance_scale"], s["negative_prompt"], s["local_blend"]) == ("p2p", 7.5, "empty", True)
    assert meta["unet_evaluations"]["total"] == N * (1 + 2 + 2)
    for name in ("edit.png", "reconstruction.png", "mask.png", "mask_raw.png", "grid.png"):
        assert (out / name).is_file()
    z = np.load(out / "latents.npz")
    mask = z["mask"]
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.sum() < mask.size
    outside = mask == 0  # LocalBlend: the last step puts the source branch there
    np.testing.assert_allclose(z["edited"][outside], z["reconstruction"][outside], atol=1e-6)


def test_cli_pix2pix_zero_with_sentences_and_regularised_inversion(tiny_sd1_dir, tmp_path):
    src, tgt = tmp_path / "circles.txt", tmp_path / "squares.txt"
    src.write_text("a red circle\na circle on a blue background\n")
    tgt.write_text("a red square\na square on a blue background\n")
    out = tmp_path / "zero"
    meta = _cli(tiny_sd1_dir, out, "--method", "pix2pix-zero", "--source-sentences", str(src),
                "--target-sentences", str(tgt), "--noise-regularization")
    s = meta["settings"]
    assert (s["method"], s["xa_guidance"], s["noise_regularization"]) == ("pix2pix-zero", 0.1, True)
    assert s["source_sentences"] == str(src)
    assert meta["unet_evaluations"]["per_step"]["target"] == 9
    assert (out / "edit.png").is_file()
