"""One optimisation step of the shapes model: the optimiser and LR schedule, the train state,
the loss (v-prediction MSE, optionally outline-weighted, plus the word-localisation term;
rematerialised on request) and the jit-compiled step that draws its batch from the device pool.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from csg_jax.shapes.train_config import EMPTY_ROW, TrainConfig
from csg_jax.shapes.train_model import init_params


def make_optimizer(cfg: TrainConfig):
    """AdamW *direction* (clip -> Adam -> decoupled weight decay); the step multiplies by -lr
    itself so the LR schedule's horizon can be a traced value (see :func:`learning_rate`).
    Weight decay skips 1-D params (biases, norm scales)."""
    import jax
    import optax

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    )


def learning_rate(step, horizon, cfg: TrainConfig):
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine to ``lr * final_lr_fraction``
    at ``horizon`` (held after). ``step``/``horizon`` may be traced ints."""
    import jax.numpy as jnp

    step = jnp.asarray(step, jnp.float32)
    warm = float(max(cfg.warmup_steps, 1))
    span = jnp.maximum(jnp.asarray(horizon, jnp.float32) - warm, 1.0)
    frac = jnp.clip((step - warm) / span, 0.0, 1.0)
    floor = cfg.final_lr_fraction
    cosine = cfg.lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < warm, cfg.lr * (step + 1) / warm, cosine)


def _train_state_class():
    from flax import struct

    @struct.dataclass
    class TrainState:
        """All of a run's mutable state; checkpointed whole, so a resumed run is bit-identical."""

        step: Any  # () int32, optimizer steps taken
        horizon: Any  # () int32, LR schedule horizon
        params: Any
        opt_state: Any
        ema: Any  # exponential moving average of params (what gets exported)
        rng: Any  # (2,) uint32 raw key data

    return TrainState


TrainState = None  # set lazily (flax import) by init_state


def init_state(cfg: TrainConfig, unet, text, tx):
    """The initial TrainState: step 0, horizon ``cfg.steps``, fresh params (:func:`init_params`),
    their EMA copy, ``tx``'s optimiser state and the key of ``cfg.seed``."""
    import jax
    import jax.numpy as jnp

    global TrainState
    if TrainState is None:
        TrainState = _train_state_class()
    params = init_params(unet, text, cfg.seed, cfg.token_embed_std)

    @jax.jit  # one small compile instead of a kernel per leaf
    def build(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            horizon=jnp.asarray(cfg.steps, jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(jax.random.key(cfg.seed)),
        )

    return build(params)


# Rematerialisation (jax.checkpoint) of the forward pass, least memory saved first. Without it
# the 32x32 self-attention dominates: ~250 MB of residuals per sample in float32 (63 GB at batch
# 256), mostly (B, 4, 1024, 1024) logits/probabilities. "attention" recomputes only attention
# internals and other large tensors in the backward pass (~72 MB/sample, ~+25% attention work);
# "full" recomputes everything but Dense outputs (~16 MB/sample, ~+33% compute).
REMAT_MODES = ("off", "attention", "full")


def remat_policy(mode: str, batch_size: int):
    """The ``jax.checkpoint`` policy of a remat mode (None: no checkpointing)."""
    import jax
    from jax import lax

    if mode == "off":
        return None
    if mode == "full":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if mode != "attention":
        raise ValueError(f"remat mode must be one of {REMAT_MODES}, not {mode!r}")
    big = batch_size * 200_000  # elements; a 32x32 self-attention map is 4.2M per sample

    def policy(prim, *avals, **params):
        """Save an op's output unless it is a batched matmul (attention) or touches a big tensor."""
        try:
            if prim is lax.dot_general_p and params["dimension_numbers"][1][0]:
                return False
            return all(int(np.prod(a.shape)) < big for a in avals if hasattr(a, "shape"))
        except Exception:  # unexpected primitive signature: recompute (always correct)
            return False

    return policy


def make_loss_fn(cfg: TrainConfig, unet, text, remat: str = "off") -> Callable:
    """``loss(params, x_t, t, ids, target, weights=None, loc=None) -> (loss, parts)``.

    The MSE of the UNet's v-prediction; with ``weights`` (B, H, W) the weighted mean
    sum(w * e^2) / sum(w) over pixels and channels. With ``loc = (columns (B, K) int32,
    masks (B, H, W) float, keep (B,) float)`` the cross-attention of those token columns is
    recorded and ``cfg.loc_weight *`` :func:`localisation_loss` is added. ``parts``:
    {"mse", "loc"} (loc 0 without ``loc``)."""
    import jax
    import jax.numpy as jnp

    from csg_jax.models.attention import AttentionControl
    from csg_jax.models.unet import attention_layers

    def loss_fn(params, x_t, t, ids, target, weights=None, loc=None):
        context = text.apply({"params": params["text_encoder"]}, ids)
        control, layers = None, []
        if loc is not None:
            layers = [l for l in attention_layers(unet.config, x_t.shape[1:3]) if l.kind == "cross"]
            control = AttentionControl(record=tuple((l.name, "token_mean") for l in layers), token_columns=loc[0])
        out, records = unet.apply({"params": params["unet"]}, x_t, t, context, control)
        err = jnp.square(out.astype(jnp.float32) - target)
        if weights is None:
            mse = jnp.mean(err)
        else:
            w = jnp.broadcast_to(weights[..., None], err.shape)
            mse = jnp.sum(w * err) / jnp.sum(w)
        if loc is None:
            return mse, {"mse": mse, "loc": jnp.zeros((), jnp.float32)}
        resolutions = {l.name: l.resolution for l in layers}
        term = localisation_loss(records, resolutions, loc[1], loc[2])
        return mse + cfg.loc_weight * term, {"mse": mse, "loc": term}

    policy = remat_policy(remat, cfg.batch_size)
    return loss_fn if remat == "off" else jax.checkpoint(loss_fn, policy=policy)


def localisation_loss(records: dict, resolutions: dict, masks, keep):
    """Mean over layers, words and kept images of ``(1 - share)^2``: TokenCompose's token loss
    (Wang et al., CVPR 2024), the grounding objective SD gets for free from its data scale.

    records: {layer: (B, h*w, K)} head-mean attention probability of K words per query pixel;
    resolutions: {layer: (h, w)}; masks: (B, H, W) float object masks (H, W multiples of h, w);
    keep: (B,) float, 1 where the image counts. ``share`` = attention mass inside the mask
    (average-pooled to the layer's grid, as :mod:`csg_jax.shapes.localisation` measures it) /
    total mass.

    Why: after 8,881 steps the shape word put only 1.35x its area share of attention inside the
    object (the issue asks >= 2): the causal text encoder copies "circle" into every later token,
    so nothing forces the UNet to read the shape from the shape word's own column, and CSG's
    mask is built from that column.
    """
    import jax.numpy as jnp

    from csg_jax.shapes.localisation import pooled_mask

    b = masks.shape[0]
    per_layer = []
    for name, attn in records.items():
        inside = pooled_mask(masks, resolutions[name]).reshape(b, -1, 1)  # (B, h*w, 1)
        attn = attn.astype(jnp.float32)
        share = jnp.sum(attn * inside, axis=1) / jnp.maximum(jnp.sum(attn, axis=1), 1e-12)  # (B, K)
        per_layer.append(jnp.mean(jnp.square(1.0 - share), axis=-1))
    per_image = jnp.mean(jnp.stack(per_layer), axis=0)
    return jnp.sum(per_image * keep) / jnp.maximum(jnp.sum(keep), 1.0)



def sample_timesteps(key, batch_size: int, num_train_timesteps: int, cfg: TrainConfig):
    """(B,) int32 training timesteps: uniform on [0, T), except that a share ``cfg.t_focus`` of
    them is uniform on [t_focus_min, t_focus_max).

    Why (for the ``sd_latent`` recipe; the cosine one needs no focus): with images scaled by
    0.18215 most of SD's timesteps leave too little signal for the
    object's outline to matter (at t = 500 a pixel's signal is 0.11 of the noise); the shape is
    decided below t ~ 400 and its corners below t ~ 150. Uniform sampling spends 60% of the steps
    where only colours and the blob's place are learned, which the model already knows early.
    For the cosine recipe the window to focus on is higher: there the shape word matters most
    around t = 700 (a wrong shape word raised the 6,406-step model's outline-band x̂₀ error by 7%
    at t = 700, by 1-3% at t = 300-500), because below ~500 the outline can be read off x_t
    itself and above ~900 even the object's place is unknown; ``t_focus 0.5`` on [500, 900) gives that window
    0.7 of the steps instead of 0.4.
    With ``t_focus = 0`` the draw is exactly the uniform one (same key use as before the option).
    """
    import jax
    import jax.numpy as jnp

    t = jax.random.randint(key, (batch_size,), 0, num_train_timesteps)
    if cfg.t_focus <= 0.0:
        return t
    k_pick, k_low = jax.random.split(jax.random.fold_in(key, 1))
    hi = min(cfg.t_focus_max, num_train_timesteps)
    focused = jax.random.randint(k_low, (batch_size,), min(cfg.t_focus_min, hi - 1), hi)
    return jnp.where(jax.random.bernoulli(k_pick, cfg.t_focus, (batch_size,)), focused, t)


def make_train_step(cfg: TrainConfig, configs: dict, unet, text, tx, remat: str = "off") -> Callable:
    """``step(state, pool, tables) -> (state, metrics)``, jit-compiled with the state donated.

    pool: {"images": (N, 32, 32, 3) uint8, "rows": (N,) int32 caption rows, "bands": (N, 32, 32)
    uint8 outline bands (:func:`edge_bands`; weighted by ``cfg.edge_weight``, unused at 0),
    "masks": (N, 32, 32) uint8 object masks (used by ``cfg.loc_weight``)}; tables: {"tokens":
    (K, 77) int32 with row 0 = "", "words": (K, len(LOC_WORDS)) int32 (:func:`word_columns`)}.
    Metrics: loss (as optimised), mse, loc (the localisation term, unweighted), grad_norm, lr
    (device scalars)."""
    import jax
    import jax.numpy as jnp
    import optax

    from csg_jax.schedule import SchedulerConfig, add_noise, make_schedule, velocity

    schedule = make_schedule(SchedulerConfig.from_dict(configs["scheduler"]), 50)  # only ᾱ is used
    T = schedule.num_train_timesteps
    B = cfg.batch_size
    loss_fn = make_loss_fn(cfg, unet, text, remat)

    def step(state, pool, tables):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_idx, k_t, k_noise, k_drop = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (B,), 0, pool["images"].shape[0])
        x0 = (pool["images"][idx].astype(jnp.float32) / 127.5 - 1.0) * cfg.scaling_factor
        drop = jax.random.bernoulli(k_drop, cfg.p_uncond, (B,))
        rows = pool["rows"][idx]
        ids = tables["tokens"][jnp.where(drop, EMPTY_ROW, rows)]
        t = sample_timesteps(k_t, B, T, cfg)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = add_noise(schedule, x0, noise, t)
        target = velocity(schedule, x0, noise, t)

        weights = None
        if cfg.edge_weight > 0:
            weights = 1.0 + cfg.edge_weight * pool["bands"][idx].astype(jnp.float32)
        loc = None
        if cfg.loc_weight > 0:  # a dropped caption has no words to ground
            keep = jnp.logical_and(~drop, t < cfg.loc_t_max).astype(jnp.float32)
            loc = (tables["words"][rows], pool["masks"][idx].astype(jnp.float32), keep)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x_t, t, ids, target, weights, loc)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, state.horizon, cfg)
        params = optax.apply_updates(state.params, jax.tree.map(lambda d: -lr * d, direction))
        # EMA with a short warm-up ((1+n)/(10+n)) so early exports are not dominated by the init.
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new, {"loss": loss, "mse": parts["mse"], "loc": parts["loc"], "grad_norm": grad_norm, "lr": lr}

    return jax.jit(step, donate_argnums=(0,))
