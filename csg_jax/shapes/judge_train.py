"""Training the shapes judge (:class:`csg_jax.shapes.judge.JudgeNet`) with optax, seeded.

Train-split images are rendered once; every step draws a batch and augments it on the fly
(brightness/contrast jitter, a random amount of blur, Gaussian noise, horizontal flips), because
the judge must read *generated* images, which are blurrier and noisier than the renders.
Vertical flips and rotations are left out: they would turn the triangle upside down.

Entry point: :func:`train_judge` (``scripts/train_judge.py`` is its CLI).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csg_jax.shapes import world
from csg_jax.shapes.judge import HEADS, Judge, JudgeNet, accuracy, to_input


@dataclasses.dataclass(frozen=True)
class JudgeTrainConfig:
    seed: int = 0
    n_train: int = 12_000  # rendered train-split images
    steps: int = 4_000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.08  # largest Gaussian noise std (images in [0, 1])
    n_heldout: int = 2_000  # held-out-split images for the reported accuracy


def augment(rng: jax.Array, x: jax.Array, noise_std: float) -> jax.Array:
    """(B, H, W, 3) in [0, 1] -> the same, randomly degraded per image."""
    b = x.shape[0]
    k = jax.random.split(rng, 6)
    u = lambda key, lo, hi, shape=(b, 1, 1, 1): jax.random.uniform(key, shape, minval=lo, maxval=hi)
    x = x * u(k[0], 0.85, 1.15) + u(k[1], -0.05, 0.05) + u(k[2], -0.03, 0.03, (b, 1, 1, 3))
    box = jnp.ones((3, 3, 1, 1), x.dtype) / 9.0
    blurred = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), jnp.tile(box, (1, 1, 1, 3)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
    x = x + u(k[3], 0.0, 1.0) * (blurred - x)
    x = x + u(k[4], 0.0, noise_std) * jax.random.normal(k[5], x.shape)
    flip = jax.random.bernoulli(jax.random.fold_in(rng, 7), 0.5, (b, 1, 1, 1))
    return jnp.clip(jnp.where(flip, x[:, :, ::-1], x), 0.0, 1.0)


def _loss(net: JudgeNet, params, x, labels: dict):
    logits = net.apply({"params": params}, x)
    losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean() for k in HEADS]
    return sum(losses)


def train_judge(cfg: JudgeTrainConfig = JudgeTrainConfig(), log=print) -> tuple[Judge, dict]:
    """Train from scratch; returns the judge and a report (config, held-out accuracy, seconds)."""
    t0 = time.perf_counter()
    data = world.make_batch(cfg.seed, cfg.n_train, split="train")
    images = jnp.asarray(data["images"])
    labels = {k: jnp.asarray(data[k]) for k in HEADS}
    render_s = time.perf_counter() - t0
    log(f"[judge] rendered {cfg.n_train} train images in {render_s:.1f}s")

    net = JudgeNet()
    key = jax.random.key(cfg.seed)
    params = net.init(jax.random.fold_in(key, 0), jnp.zeros((1, 32, 32, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(200, cfg.steps // 10), cfg.steps, cfg.lr * 0.02)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        k = jax.random.fold_in(key, i + 1)
        idx = jax.random.randint(jax.random.fold_in(k, 0), (cfg.batch_size,), 0, images.shape[0])
        x = augment(jax.random.fold_in(k, 1), to_input(images[idx]), cfg.noise_std)
        loss, grads = jax.value_and_grad(lambda p: _loss(net, p, x, {n: v[idx] for n, v in labels.items()}))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t1 = time.perf_counter()
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, opt_state, i)
        if (i + 1) % 500 == 0 or i == 0:
            log(f"[judge] step {i + 1}/{cfg.steps} loss {float(loss):.4f} ({time.perf_counter() - t1:.0f}s)")
    train_s = time.perf_counter() - t1

    judge = Judge(params=params)
    heldout = world.make_batch(cfg.seed, cfg.n_heldout, split="heldout")
    acc = accuracy(judge, heldout)
    noisy = dict(heldout, images=np.asarray(augment(jax.random.fold_in(key, 2**31 - 1), to_input(heldout["images"]),
                                                     cfg.noise_std)))
    report = {
        "config": dataclasses.asdict(cfg),
        "heldout_accuracy": acc,
        "heldout_accuracy_augmented": accuracy(judge, noisy),
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
    }
    log(f"[judge] held-out accuracy {acc}; augmented {report['heldout_accuracy_augmented']}")
    return dataclasses.replace(judge, report=report), report
