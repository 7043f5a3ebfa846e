"""Null-text inversion (Mokady et al., CVPR 2023) as one jit-compiled scan, for every method.

Plain DDIM inversion (no guidance) followed by classifier-free guided sampling drifts away from
the image: at guidance g the sampler does not retrace the inversion's trajectory. Null-text
inversion keeps the inversion and, step by step, optimises the *negative* ("null") text
embedding so that the guided step lands on the inversion latent of the next timestep:

    for i = 0 .. N-1 (sampling order, timestep t_i):
        eps_c = eps(x_i, t_i, source)                       # fixed during the inner loop
        repeat up to K times (Adam, lr 1e-2 (1 - i/100)):
            x_prev = DDIM(eps(x_i, t_i, null) + g (eps_c - eps(x_i, t_i, null)))
            loss = mean (x_prev - z*_{i+1})^2; step; stop early once loss < 1e-5 + 2e-5 i
        x_{i+1} = DDIM(guided eps with the optimised null)   # the next step starts here
        null_{i+1} starts from null_i

Everything is one ``lax.scan`` over the timesteps with a ``lax.while_loop`` inside (per-image
early stopping: images that reached the threshold stop being updated; the loop ends when all
have, or after K steps), the gradient is ``jax.grad`` of the loss through our UNet with respect
to the (B, 77, D) embedding, and the optimiser is ``optax.scale_by_adam`` (PyTorch's Adam:
beta 0.9 / 0.999, eps 1e-8, a fresh state per timestep as in the reference code) times the
per-step learning rate. The result, one null embedding per sampling step (N, B, 77, D), is the
``uncond`` argument of the source and target passes of every method.

Shapes: B images, latents (B, h, w, C), contexts (B, 77, D).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from csg_jax.editing.core import cfg, ddim_inversion, per_image, unet
from csg_jax.schedule import DDIMSchedule, ddim_transfer, sampling_plan

BASE_LR = 1e-2  # learning rate at the first step; lr_i = BASE_LR (1 - i / 100)
EARLY_STOP = 1e-5  # loss threshold at the first step; grows by 2e-5 per step (reference code)
EARLY_STOP_SLOPE = 2e-5


class NullTextResult(NamedTuple):
    x_T: jax.Array  # (B, h, w, C) the DDIM-inverted latent the sampler starts from
    uncond: jax.Array  # (N, B, 77, D) optimised negative embedding of each sampling step
    reconstruction: jax.Array  # (B, h, w, C) guided sampling with those embeddings from x_T
    iterations: jax.Array  # (N, B) int32 Adam steps taken per timestep and image
    loss: jax.Array  # (N, B) float32 the last loss evaluated per timestep and image


def optimize_null_text(pipe, params, trajectory, x_T, source_ctx, negative_ctx, schedule: DDIMSchedule,
                       guidance_scale, inner_steps: int = 10) -> NullTextResult:
    """The null-text optimisation over a standard DDIM inversion ``trajectory`` (N, B, h, w, C)
    ending in ``x_T``; ``negative_ctx`` (B, 77, D) is the starting embedding (the empty prompt in
    the reference code, or whatever negative prompt the edit uses); ``guidance_scale`` () or (B,)."""
    b = x_T.shape[0]
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    n = timesteps.shape[0]
    g = per_image(guidance_scale)
    targets = trajectory[::-1]  # sampling step i must land on the inversion latent z*_{N-1-i}
    adam = optax.scale_by_adam()
    pred = schedule.prediction_type

    def guided_step(x, t, a_t, a_prev, eps_cond, null):
        eps_null, _ = unet(pipe, params, x, t, null)
        return ddim_transfer(cfg(eps_null, eps_cond, g), x, a_t, a_prev, pred)

    def outer(carry, xs):
        x, null = carry
        i, t, a_t, a_prev, target = xs
        eps_cond, _ = unet(pipe, params, x, t, source_ctx)
        lr = BASE_LR * (1.0 - i / 100.0)
        threshold = EARLY_STOP + EARLY_STOP_SLOPE * i

        def per_image_loss(emb):  # (B,) mean squared error of each image; summed for the gradient
            err = guided_step(x, t, a_t, a_prev, eps_cond, emb) - target
            return jnp.mean(jnp.square(err), axis=(1, 2, 3))

        def loss_sum(emb):
            losses = per_image_loss(emb)
            return jnp.sum(losses), losses

        def cond(state):
            j, _, _, done, _, _ = state
            return (j < inner_steps) & ~jnp.all(done)

        def body(state):
            j, emb, opt, done, iters, last = state
            (_, losses), grad = jax.value_and_grad(loss_sum, has_aux=True)(emb)
            updates, opt = adam.update(grad, opt)
            active = (~done)[:, None, None]
            emb = jnp.where(active, emb - lr * updates, emb)
            last = jnp.where(done, last, losses)
            iters = iters + (~done).astype(jnp.int32)
            done = done | (losses < threshold)  # checked after the step, like the reference's break
            return j + 1, emb, opt, done, iters, last

        init = (jnp.int32(0), null, adam.init(null), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
                jnp.zeros((b,), jnp.float32))
        _, null, _, _, iters, last = jax.lax.while_loop(cond, body, init)
        x_next = guided_step(x, t, a_t, a_prev, eps_cond, null)
        return (x_next, null), (null, iters, last)

    xs = (jnp.arange(n, dtype=jnp.float32), timesteps, alpha_t, alpha_prev, targets)
    init = (x_T.astype(jnp.float32), negative_ctx.astype(jnp.float32))
    (recon, _), (nulls, iters, losses) = jax.lax.scan(outer, init, xs)
    return NullTextResult(x_T, nulls.astype(negative_ctx.dtype), recon, iters, losses)


def null_text_inversion(pipe, params, x0, source_ctx, negative_ctx, schedule: DDIMSchedule, guidance_scale,
                        inner_steps: int = 10, noise_fn: Optional[Callable] = None) -> NullTextResult:
    """Standard DDIM inversion of ``x0`` on the source prompt, then :func:`optimize_null_text`."""
    x_T, trajectory = ddim_inversion(pipe, params, x0, source_ctx, schedule, "standard", noise_fn, trajectory=True)
    return optimize_null_text(pipe, params, trajectory, x_T, source_ctx, negative_ctx, schedule, guidance_scale,
                              inner_steps)
