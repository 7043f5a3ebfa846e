"""Pieces of the shapes-model trainer that are cheap to check on a CPU (the whole run is checked
with ``scripts/train_shapes.py --smoke``)."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.errors import ConfigError
from csg_jax.shapes import checkpoint as K
from csg_jax.shapes import train_config as C
from csg_jax.shapes import train_data as D
from csg_jax.shapes import train_loop as L
from csg_jax.shapes import train_memory as R
from csg_jax.shapes import train_model as M
from csg_jax.shapes import train_step as S
from csg_jax.shapes import world


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from csg_jax.tokenizer_files import write_clip_tokenizer

    folder = str(tmp_path_factory.mktemp("shapes_tok"))
    write_clip_tokenizer(folder, D.shapes_words())
    return D.load_tokenizer(folder)


def test_caption_table_covers_the_world_and_words_are_single_tokens(tokenizer):
    table = D.all_captions()
    assert table[C.EMPTY_ROW] == "" and len(table) == 1 + 5 * 8 * 7 == len(set(table))
    batch = world.make_batch(3, 200)
    rows = D.caption_rows(batch["captions"], table)
    assert [table[r] for r in rows] == batch["captions"]
    ids = D.tokenize(tokenizer, table)
    eos = ids[0, 1]
    assert ids.shape == (len(table), 77) and ids.dtype == np.int32
    assert all(np.sum(row != eos) == 1 + 7 for row in ids[1:])  # BOS + 7 one-token words
    assert M.model_configs()["text_encoder"]["vocab_size"] > int(ids.max())
    with pytest.raises(ValueError):
        D.caption_rows(["a pink circle"], table)


def test_word_columns_point_at_the_colour_and_shape_words(tokenizer):
    table = D.all_captions()
    cols = D.word_columns(tokenizer, table)
    ids = D.tokenize(tokenizer, table)
    assert cols.shape == (len(table), len(C.LOC_WORDS)) and not cols[C.EMPTY_ROW].any()
    for row in (1, 57, len(table) - 1):
        words = table[row].split()  # "a red circle on a blue background": one token per word after BOS
        parsed = world.parse_caption(table[row])
        for j, attribute in enumerate(C.LOC_WORDS):
            assert cols[row, j] == 1 + words.index(parsed[attribute])
            single = tokenizer(parsed[attribute], add_special_tokens=False)["input_ids"]
            assert [ids[row, cols[row, j]]] == single


def test_localisation_loss_closed_forms():
    """(1 - share)^2 per word, share = attention mass inside the pooled mask; mean over layers,
    words and kept images."""
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 8, 8), np.float32)
    masks[:, 2:6, 3:5] = 1.0  # 8 of 64 pixels; pooled to 4x4: 4 cells half covered
    res = {"a": (4, 4), "b": (2, 2)}
    # Layer "a": word 0 all on the covered cells (share 0.5), word 1 uniform (share 8/64).
    on = np.zeros((3, 16, 2), np.float32)
    cover = masks.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(3, 16)
    on[:, :, 0] = (cover > 0) / (cover > 0).sum(axis=1, keepdims=True)
    on[:, :, 1] = 1 / 16
    # Layer "b": random attention, share computed from its definition.
    rand = rng.random((3, 4, 2)).astype(np.float32)
    cover_b = masks.reshape(3, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(3, 4)
    share_b = (rand * cover_b[..., None]).sum(axis=1) / rand.sum(axis=1)
    per_image = ((1 - 0.5) ** 2 + (1 - 8 / 64) ** 2) / 2 / 2 + np.mean((1 - share_b) ** 2, axis=-1) / 2
    keep = np.array([1.0, 0.0, 1.0], np.float32)
    got = S.localisation_loss({"a": jnp.asarray(on), "b": jnp.asarray(rand)}, res, jnp.asarray(masks), jnp.asarray(keep))
    assert float(got) == pytest.approx((per_image[0] + per_image[2]) / 2, rel=1e-5)
    # All attention inside a fully covered region: zero loss.
    full = np.ones((1, 8, 8), np.float32)
    assert float(S.localisation_loss({"a": jnp.asarray(on[:1])}, res, jnp.asarray(full), jnp.ones(1))) == pytest.approx(0.0, abs=1e-7)
    # Nothing kept: 0, not NaN.
    assert float(S.localisation_loss({"a": jnp.asarray(on)}, res, jnp.asarray(masks), jnp.zeros(3))) == 0.0


def test_init_params_shapes_distributions_and_determinism():
    unet, text = M.build_models(M.model_configs())
    params = M.init_params(unet, text, seed=0)
    shapes = M.param_shapes(unet, text)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
        assert p.shape == s.shape and p.dtype == np.float32
    tok = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert abs(tok.std() - 1.0) < 0.02
    kernel = params["unet"]["conv_in"]["kernel"]  # (3, 3, 3, 32): fan-in 27
    assert abs(kernel.std() - np.sqrt(1 / 27)) < 0.02 and np.abs(kernel).max() <= 2 * np.sqrt(1 / 27) / 0.8796 + 1e-6
    again = M.init_params(unet, text, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))


def test_learning_rate_warmup_cosine_floor():
    cfg = C.TrainConfig(lr=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    lr = lambda s, h=110: float(S.learning_rate(s, h, cfg))
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3) and lr(60) == pytest.approx(0.55e-3)
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    assert lr(60, 1010) > lr(60, 110)  # a longer horizon decays more slowly


def test_timestep_focus_draws_the_requested_share_below_the_cut():
    key = jax.random.key(3)
    cfg = C.TrainConfig()
    uniform = np.asarray(S.sample_timesteps(key, 20000, 1000, cfg))
    # t_focus = 0 is the plain uniform draw, key for key (old runs resume identically).
    np.testing.assert_array_equal(uniform, np.asarray(jax.random.randint(key, (20000,), 0, 1000)))
    focused = np.asarray(S.sample_timesteps(key, 20000, 1000, C.TrainConfig(t_focus=0.5, t_focus_max=400)))
    assert focused.min() >= 0 and focused.max() <= 999
    # P(t < 400) = 0.5 + 0.5 * 0.4 = 0.7 (uniform: 0.4); P(t >= 400) is spread evenly above the cut.
    assert abs((focused < 400).mean() - 0.7) < 0.015 and abs((uniform < 400).mean() - 0.4) < 0.015
    above = np.histogram(focused[focused >= 400], bins=6, range=(400, 1000))[0]
    assert above.min() > 0.8 * above.mean()
    # A window [500, 900): P(500 <= t < 900) = 0.5 + 0.5 * 0.4 = 0.7, the rest evenly spread.
    window = np.asarray(S.sample_timesteps(key, 20000, 1000, C.TrainConfig(t_focus=0.5, t_focus_min=500, t_focus_max=900)))
    inside = (window >= 500) & (window < 900)
    assert abs(inside.mean() - 0.7) < 0.015 and window.min() >= 0 and window.max() <= 999
    below = np.histogram(window[window < 500], bins=5, range=(0, 500))[0]
    above = np.histogram(window[window >= 900], bins=1, range=(900, 1000))[0]
    assert below.min() > 0.8 * below.mean() and abs(above[0] / below.mean() - 1) < 0.2


def test_batch_shrinks_to_fit_the_memory_estimate():
    gib = 2**30
    assert R._fitting_batch(256, 40 * gib, 60 * gib) == 256
    assert R._fitting_batch(256, 90 * gib, 60 * gib) == 128
    assert R._fitting_batch(256, 200 * gib, 60 * gib) == 64
    assert R._fitting_batch(256, 200 * gib, None) == 256
    assert R._fitting_batch(16, 200 * gib, 60 * gib) == R.MIN_BATCH


def test_pool_is_the_same_with_workers_or_without():
    job = D.PoolJob(300, seed=5, workers=2, chunk=128)
    images, captions, masks = job.result()
    tasks = [(D.chunk_seed(5, i), n) for i, n in enumerate((128, 128, 44))]
    ref = [D.render_chunk(t) for t in tasks]
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, np.concatenate([r[0] for r in ref]))
    assert captions == [c for r in ref for c in r[1]]
    assert masks.shape == (300, 32, 32) and np.array_equal(masks, np.concatenate([r[2] for r in ref]))
    assert job.seconds is not None and job.seconds > 0


def test_pool_falls_back_to_repeating_a_smaller_pool_rendered_in_process():
    job = D.PoolJob(300, seed=5, workers=1, chunk=128)
    job._pool.terminate()  # dead workers: their tasks never finish
    images, captions, masks = job.result(timeout=1.0, fallback=100)
    assert images.shape == (300, 32, 32, 3) and len(captions) == 300 and masks.shape == (300, 32, 32)
    assert np.array_equal(images[100:200], images[:100]) and captions[250] == captions[50]
    assert np.array_equal(masks[100:200], masks[:100])


def test_edge_band_is_the_ring_around_the_outline():
    square = np.zeros((32, 32), bool)
    square[10:20, 10:20] = True
    band = D.edge_bands(square[None], 2)[0]
    # Closed form: within 2 (8-neighbour) steps of the outline = the 14x14 grown square minus the
    # 6x6 shrunk one.
    expected = np.zeros((32, 32), bool)
    expected[8:22, 8:22] = True
    expected[12:18, 12:18] = False
    assert band.dtype == np.uint8 and np.array_equal(band.astype(bool), expected)
    assert not D.edge_bands(np.zeros((1, 32, 32), bool), 2).any()
    # On world scenes: the band holds every pixel where the mask changes, and nothing far inside.
    masks = world.make_batch(1, 16)["masks"]
    bands = D.edge_bands(masks, 1).astype(bool)
    changes = np.zeros_like(masks)
    changes[:, 1:] |= masks[:, 1:] != masks[:, :-1]
    changes[:, :, 1:] |= masks[:, :, 1:] != masks[:, :, :-1]
    assert np.all(bands[changes]) and 0 < bands.mean() < 0.5


def test_weighted_loss_is_the_weighted_mean_of_squared_errors():
    configs = _tiny_configs()
    unet, text = M.build_models(configs)
    cfg = C.TrainConfig(batch_size=2)
    state = S.init_state(cfg, unet, text, S.make_optimizer(cfg))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    t, ids = jnp.array([10, 700]), jnp.ones((2, 77), jnp.int32)
    weights = 1.0 + 4.0 * rng.integers(0, 2, (2, 16, 16)).astype(np.float32)
    loss_fn = jax.jit(S.make_loss_fn(cfg, unet, text))  # (jitted: op-by-op dispatch of a UNet is slow)
    context = jax.jit(text.apply)({"params": state.params["text_encoder"]}, ids)
    out = np.asarray(jax.jit(unet.apply)({"params": state.params["unet"]}, x, t, context)[0], np.float64)
    err = (out - np.asarray(target, np.float64)) ** 2
    expected = (err * weights[..., None]).sum() / (3 * weights.sum())
    assert float(loss_fn(state.params, x, t, ids, target, jnp.asarray(weights))[0]) == pytest.approx(expected, rel=1e-5)
    loss, parts = loss_fn(state.params, x, t, ids, target)
    assert float(loss) == float(parts["mse"]) == pytest.approx(err.mean(), rel=1e-5) and float(parts["loc"]) == 0.0


def test_localisation_term_records_attention_and_its_gradient_grounds_the_words():
    """With ``loc`` the loss adds loc_weight x the localisation term of the recorded attention,
    leaves the prediction (mse) unchanged, and a gradient step on it moves the words'
    attention into the masks."""
    configs = _tiny_configs()
    unet, text = M.build_models(configs)
    cfg = C.TrainConfig(batch_size=4, loc_weight=0.5)
    state = S.init_state(cfg, unet, text, S.make_optimizer(cfg))
    batch = world.make_batch(5, 4)
    x = jnp.asarray(batch["images"][:, ::2, ::2], jnp.float32) / 127.5 - 1  # 16x16
    masks = jnp.asarray(batch["masks"][:, ::2, ::2], jnp.float32)
    ids = jnp.asarray(np.arange(4 * 77).reshape(4, 77) % 300 + 1, jnp.int32)
    t = jnp.array([10, 200, 400, 600])
    loc = (jnp.array([[2, 3]] * 4, jnp.int32), masks, jnp.ones(4))
    loss_fn = jax.jit(S.make_loss_fn(cfg, unet, text))
    plain, plain_parts = loss_fn(state.params, x, t, ids, x)
    loss, parts = loss_fn(state.params, x, t, ids, x, None, loc)
    assert float(parts["mse"]) == pytest.approx(float(plain_parts["mse"]), rel=1e-6)
    assert 0.0 < float(parts["loc"]) < 1.0
    assert float(loss) == pytest.approx(float(parts["mse"]) + 0.5 * float(parts["loc"]), rel=1e-6)
    term = jax.jit(lambda p: loss_fn(p, x, t, ids, x, None, loc)[1]["loc"])
    grads = jax.grad(term)(state.params)
    norm = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g / norm, state.params, grads)
    assert float(term(stepped)) < float(parts["loc"])


def _tiny_configs():
    configs = copy.deepcopy(M.model_configs())
    configs["unet"].update(block_out_channels=[8, 16, 16], layers_per_block=1, attention_head_dim=2,
                           norm_num_groups=4)
    return configs


def test_remat_keeps_fewer_residuals():
    configs = _tiny_configs()
    unet, text = M.build_models(configs)
    params = M.param_shapes(unet, text)
    cfg = C.TrainConfig(batch_size=2)
    sizes = [R.residual_bytes(cfg, unet, text, params, mode) for mode in S.REMAT_MODES]
    assert sizes[0] > sizes[1] > sizes[2] > 0
    # The localisation term traces too (its recorded attention adds residuals).
    assert R.residual_bytes(dataclasses.replace(cfg, loc_weight=0.1), unet, text, params, "off") >= sizes[0]


@pytest.mark.slow
def test_train_step_remat_equivalence_learning_and_export(tmp_path):
    """The real train step on a tiny UNet: remat "attention" computes the same update as no remat,
    a few steps lower the loss, and the export loads as a pixel model with the EMA weights."""
    from csg_jax.pipeline import load_pipeline

    configs = _tiny_configs()
    unet, text = M.build_models(configs)
    cfg = C.TrainConfig(batch_size=4, steps=30, warmup_steps=1, lr=1e-3, edge_weight=4.0, loc_weight=0.1)
    tx = S.make_optimizer(cfg)
    state = S.init_state(cfg, unet, text, tx)
    batch = world.make_batch(0, 4)
    table = D.all_captions()
    pool = {"images": jnp.asarray(batch["images"][:, ::2, ::2]),  # 16x16: fast
            "rows": jnp.asarray(D.caption_rows(batch["captions"], table)),
            "bands": jnp.asarray(D.edge_bands(batch["masks"][:, ::2, ::2], 1)),
            "masks": jnp.asarray(batch["masks"][:, ::2, ::2], jnp.uint8)}
    tables = {"tokens": jnp.asarray(np.arange(len(table) * 77).reshape(-1, 77) % 500, jnp.int32),
              "words": jnp.asarray(np.tile([[2, 3]], (len(table), 1)), jnp.int32)}

    plain = S.make_train_step(cfg, configs, unet, text, tx, "off")
    step = S.make_train_step(cfg, configs, unet, text, tx, "attention")
    ref, m_ref = plain(jax.tree.map(jnp.copy, state), pool, tables)  # donates the copy
    state, m = step(state, pool, tables)
    # (Params after one Adam step are no test: g / (|g| + eps) of near-zero gradients is noise.)
    assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(float(m_ref["grad_norm"]), rel=1e-4)
    assert 0.0 < float(m["loc"]) < 1.0 and float(m["loss"]) > float(m["mse"])

    losses = [float(m["loss"])]
    for _ in range(29):
        state, m = step(state, pool, tables)
        losses.append(float(m["loss"]))
    assert int(state.step) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    folder = K.export_model(str(tmp_path / "model"), configs, state.ema, 30, tar_path=str(tmp_path / "m.tar"))
    pipe = load_pipeline(folder)
    assert pipe.kind == "pixel" and pipe.scaling_factor == C.SCALING_FACTOR
    assert pipe.scheduler_config.prediction_type == "v_prediction"
    ema = jax.device_get(state.ema)
    for a, b in zip(jax.tree.leaves(pipe.params["unet"]), jax.tree.leaves(ema["unet"])):
        np.testing.assert_array_equal(a, np.asarray(b, np.float16).astype(np.float32))
    assert (tmp_path / "m.tar").stat().st_size > 0
    assert pipe.scheduler_config.beta_schedule == cfg.beta_schedule == "squaredcos_cap_v2"
    # A run started from an earlier model records the steps behind it too.
    assert K.trained_steps_of(folder) == 30
    continued = K.export_model(str(tmp_path / "continued"), configs, state.ema, 30, base_steps=5325)
    assert K.trained_steps_of(continued) == 5355 and K.trained_steps_of(str(tmp_path / "absent")) == 0
    with open(os.path.join(continued, "model_index.json")) as f:
        assert json.load(f)["csg_jax"]["init_steps"] == 5325

    # --init-from: the export's weights come back as this run's float32 params ...
    loaded = M.load_params_from_folder(folder, unet, text)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, np.asarray(b, np.float16).astype(np.float32))
    # ... and a model of another architecture is refused with a message, not a shape error later.
    other = copy.deepcopy(configs)
    other["unet"]["block_out_channels"] = [8, 16, 32]
    with pytest.raises(ConfigError, match="architecture"):
        M.load_params_from_folder(folder, *M.build_models(other))


def test_resume_refuses_a_checkpoint_of_another_recipe():
    cosine = C.TrainConfig()
    legacy = C.TrainConfig(beta_schedule="scaled_linear", scaling_factor=0.18215)
    C.check_recipe({"beta_schedule": "squaredcos_cap_v2", "scaling_factor": 1.0}, cosine)
    C.check_recipe({"steps": 100}, legacy)  # saved before the fields existed: the SD recipe
    with pytest.raises(ConfigError, match="--recipe sd_latent"):
        C.check_recipe({"steps": 100}, cosine)
    with pytest.raises(ConfigError, match="--recipe pixel_cosine"):
        C.check_recipe(dataclasses.asdict(cosine), legacy)


def test_the_loop_waits_for_all_but_the_newest_steps():
    """The budget / signal checks run at most ``depth`` steps ahead of the device."""
    waited = []

    class Step:
        def __init__(self, i):
            self.i = i

        def block_until_ready(self):
            waited.append(self.i)
            return self

    pending = []
    for i in range(5):
        pending.append({"loss": Step(i)})
        L._wait_for_older_steps(pending, depth=2)
        assert waited == list(range(max(0, i - 1)))


def test_a_signal_asks_for_a_clean_stop_and_a_second_one_interrupts():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    request = L._StopRequest()
    try:
        assert request.signal is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before kill returns
        assert request.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is before  # the second signal restored the handlers
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RuntimeError):  # the training loop fails: Ctrl-C must work again afterwards
        with L._StopRequest():
            assert signal.getsignal(signal.SIGINT) is not before_int
            raise RuntimeError
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before_int
