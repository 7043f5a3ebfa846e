"""DDIM noise schedule, sampling and inversion steps in pure JAX.

Everything here is a pure function of arrays, so it can run inside ``jax.jit`` and
``jax.lax.scan``. Notation follows ``docs/csg-reference.md``: N inference steps,
r = num_train_timesteps // N, ᾱ = ``alphas_cumprod``.

* Forward process (DDPM): x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε.
* Deterministic DDIM transfer (DDIM paper Eq. 12 with η = 0; CSG Eq. 3), used both to
  denoise (ᾱ_to > ᾱ_from) and to invert (ᾱ_to < ᾱ_from)::

      x_to = √ᾱ_to · x̂_0 + √(1−ᾱ_to) · ε̂,   (ε̂, x̂_0) predicted at (x_from, ᾱ_from).

* CSG Eq. 4/6: an epsilon DDIM step is x_prev = √(ᾱ_prev/ᾱ_t)·x_t − √(1−ᾱ_t)·γ_t·ε̂ with
  γ_t = √(ᾱ_prev/ᾱ_t) − √((1−ᾱ_prev)/(1−ᾱ_t)) (see :func:`gamma`).

Parity: :func:`ddim_step` reproduces ``diffusers.DDIMScheduler.step(..., eta=0)`` and the
standard :func:`inversion_plan` reproduces ``diffusers.DDIMInverseScheduler`` (same config);
``alphas_cumprod`` is bit-identical to diffusers' float32 values (see :func:`_torch_linspace_f32`).

Typical use::

    sched = make_schedule(SchedulerConfig.from_dict(json.load(f)), 50)
    ts, a_from, a_to = inversion_plan(sched)              # each (K,)
    def body(x, xs):
        t, a0, a1 = xs
        return ddim_inversion_step(sched, unet(x, t), a0, a1, x), None
    x_T, _ = jax.lax.scan(body, x0_latent, (ts, a_from, a_to))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csg_jax.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
INVERSION_VARIANTS = ("standard", "official")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers ``scheduler/scheduler_config.json`` that DDIM uses.

    Defaults are diffusers' ``DDIMScheduler`` defaults, except ``clip_sample`` (we only support
    ``False``, which every Stable Diffusion config states explicitly; clipping x̂_0 to [-1, 1]
    is meaningless for latents). Whatever ``_class_name`` says (SD configs often name
    ``PNDMScheduler``), we run DDIM on these betas, as the CSG code does.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"beta_schedule {self.beta_schedule!r} is not supported (supported: {', '.join(BETA_SCHEDULES)})"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not supported (supported: {', '.join(PREDICTION_TYPES)})"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported "
                f"(supported: {', '.join(TIMESTEP_SPACINGS)})"
            )
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}")
        if not 0.0 < float(self.beta_start) <= float(self.beta_end) < 1.0:
            raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Build from a ``scheduler_config.json`` dict; unknown/bookkeeping keys are ignored.

        Raises ConfigError for keys that would change the maths in ways we do not implement:
        ``trained_betas`` (non-null), ``clip_sample: true``, ``thresholding: true``,
        ``rescale_betas_zero_snr: true``, and unsupported values of the fields above.
        """
        if d.get("trained_betas") is not None:
            raise ConfigError("scheduler config: trained_betas is not supported; use beta_start/beta_end/beta_schedule")
        for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if d.get(flag, False):
                raise ConfigError(f"scheduler config: {flag}=true is not supported (set it to false)")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None}
        for name in ("beta_start", "beta_end"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


@struct.dataclass
class DDIMSchedule:
    """Arrays of a DDIM schedule for N inference steps (a pytree; static fields are hashable).

    alphas_cumprod:      (T,) float32, ᾱ_t for t = 0..T−1 (T = num_train_timesteps).
    final_alpha_cumprod: () float32, ᾱ used for timesteps < 0 (1.0 if set_alpha_to_one else ᾱ_0).
    timesteps:           (N,) int32, descending, exactly ``DDIMScheduler.set_timesteps(N)``.
    prev_timesteps:      (N,) int32, ``timesteps − r`` (r = T // N, diffusers' rule for every
                         spacing); negative means "use final_alpha_cumprod".
    """

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    timesteps: jax.Array
    prev_timesteps: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False)
    num_inference_steps: int = struct.field(pytree_node=False)
    step_ratio: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` bit for bit (CPU kernel): both ends are
    rounded to float32, step = (end − start)/(n − 1) in float32, the first half is
    start + step·i and the second half end − step·(n−1−i), each with one rounding (fused)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64(np.float32((e - s) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(s) + step * i
    hi = np.float64(e) - step * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal), as diffusers' ``betas_for_alpha_bar``:
    ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta), computed in
    float64 and rounded once to float32. Ignores beta_start/beta_end, as diffusers does."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], np.float32)


def alphas_cumprod_np(config: SchedulerConfig) -> np.ndarray:
    """ᾱ (T,) float32 as diffusers computes it (float32 betas, cumprod accumulated in float64)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, T)
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:  # scaled_linear (latent diffusion): linspace of sqrt(beta), squared in float32
        betas = np.square(_torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, T))
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def timesteps_np(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """(N,) int64 descending timesteps of ``DDIMScheduler.set_timesteps(N)``."""
    T, N = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].astype(np.int64) + config.steps_offset
    elif config.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    else:  # linspace
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    return ts


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> DDIMSchedule:
    """DDIM schedule for ``num_inference_steps`` (N) steps; host-side, call outside jit."""
    T, N = config.num_train_timesteps, int(num_inference_steps)
    if not 1 <= N <= T:
        raise ConfigError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    ac = alphas_cumprod_np(config)
    ts = timesteps_np(config, N)
    if ts.max() >= T:
        raise ConfigError(f"steps_offset {config.steps_offset} pushes timesteps past {T - 1}")
    r = T // N
    final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
    return DDIMSchedule(
        alphas_cumprod=jnp.asarray(ac),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        timesteps=jnp.asarray(ts, jnp.int32),
        prev_timesteps=jnp.asarray(ts - r, jnp.int32),
        num_train_timesteps=T,
        num_inference_steps=N,
        step_ratio=r,
        prediction_type=config.prediction_type,
    )


def alpha_at(schedule: DDIMSchedule, t: jax.Array) -> jax.Array:
    """ᾱ_t for integer t of any shape: ``alphas_cumprod[t]`` if t ≥ 0 else ``final_alpha_cumprod``."""
    t = jnp.asarray(t)
    idx = jnp.clip(t, 0, schedule.num_train_timesteps - 1)
    return jnp.where(t >= 0, schedule.alphas_cumprod[idx], schedule.final_alpha_cumprod)


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """Right-pad ``a``'s shape with ones so that it broadcasts against ``x`` over leading dims
    (a scalar stays a scalar; an (B,) alpha applies per batch element of an (B, h, w, c) x)."""
    a = jnp.asarray(a, dtype=x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _prediction_type(schedule_or_type: DDIMSchedule | str) -> str:
    return schedule_or_type if isinstance(schedule_or_type, str) else schedule_or_type.prediction_type


def predict_eps_and_x0(
    model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """(ε̂, x̂_0) from the model output at x_t = ``sample`` with ᾱ_t = ``alpha_t``.

    model_output, sample: same shape (B, ...); alpha_t: scalar or sample's leading dims.
    epsilon:       x̂_0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ.
    v_prediction:  v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022, Sec. 4)
                   ⇒ x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v, ε̂ = √ᾱ·v + √(1−ᾱ)·x_t.
    sample:        x̂_0 = model_output, ε̂ = (x_t − √ᾱ·x̂_0)/√(1−ᾱ).
    """
    a = _bcast(alpha_t, sample)
    sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
    if prediction_type == "epsilon":
        return model_output, (sample - sb * model_output) / sa
    if prediction_type == "v_prediction":
        return sa * model_output + sb * sample, sa * sample - sb * model_output
    if prediction_type == "sample":
        return (sample - sa * model_output) / sb, model_output
    raise ConfigError(
        f"prediction_type {prediction_type!r} is not supported (supported: {', '.join(PREDICTION_TYPES)})"
    )


def ddim_transfer(
    model_output: jax.Array,
    sample: jax.Array,
    alpha_from: jax.Array,
    alpha_to: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """Deterministic DDIM move x_from (at ᾱ_from) → x_to (at ᾱ_to) (DDIM Eq. 12, η = 0):
    x_to = √ᾱ_to · x̂_0 + √(1−ᾱ_to) · ε̂. Shapes as in :func:`predict_eps_and_x0`."""
    eps, x0 = predict_eps_and_x0(model_output, sample, alpha_from, prediction_type)
    a = _bcast(alpha_to, sample)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps


def ddim_step(schedule: DDIMSchedule, model_output: jax.Array, t: jax.Array, sample: jax.Array) -> jax.Array:
    """One DDIM sampling step x_t → x_{t−r} (η = 0), = ``DDIMScheduler.step(out, t, x, eta=0).prev_sample``.

    t: int scalar (or sample's leading dims); ᾱ_prev = final_alpha_cumprod when t − r < 0.
    """
    t = jnp.asarray(t)
    return ddim_transfer(
        model_output, sample, alpha_at(schedule, t), alpha_at(schedule, t - schedule.step_ratio),
        schedule.prediction_type,
    )


def ddim_inversion_step(
    schedule: DDIMSchedule | str,
    model_output: jax.Array,
    alpha_t: jax.Array,
    alpha_next: jax.Array,
    sample: jax.Array,
) -> jax.Array:
    """One DDIM inversion step: the current ``sample`` sits at ᾱ_t = ``alpha_t``; returns the
    noisier x_next = √ᾱ_next·x̂_0 + √(1−ᾱ_next)·ε̂ with (ε̂, x̂_0) predicted at the current sample.

    ``schedule`` only supplies the prediction type (a DDIMSchedule or the type string).
    Use with :func:`inversion_plan` for (t, ᾱ_t, ᾱ_next).
    """
    return ddim_transfer(model_output, sample, alpha_t, alpha_next, _prediction_type(schedule))


# --------------------------------------------------------------------------------------
# Plans: per-step arrays to scan over
# --------------------------------------------------------------------------------------


def sampling_plan(schedule: DDIMSchedule) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Arrays for the denoising scan, each (N,): (timesteps, ᾱ_t, ᾱ_prev).

    Step i evaluates the UNet at timesteps[i] (descending) and maps ᾱ_t → ᾱ_prev with
    ᾱ_prev = ᾱ[t − r] (final_alpha_cumprod for the last step), exactly as DDIMScheduler.
    Used after either inversion variant: sampling always starts at timesteps[0]
    (= (N−1)r + 1 for SD-v1).
    """
    ts = schedule.timesteps
    return ts, alpha_at(schedule, ts), alpha_at(schedule, schedule.prev_timesteps)


def inversion_plan(schedule: DDIMSchedule, variant: str = "standard") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Arrays for the inversion scan, each (K,): (unet_timesteps, ᾱ_from, ᾱ_to).

    "standard" (K = N), the exact mirror of :func:`sampling_plan` and identical to
    ``diffusers.DDIMInverseScheduler`` with the same config (also Prompt-to-Prompt/null-text
    ``next_step``): for the ascending timesteps t, the UNet sees t and the step maps
    ᾱ[t − r] (final_alpha_cumprod, i.e. ᾱ_0 for SD, at the first step) → ᾱ[t]. It ends at
    ᾱ[timesteps[0]], where sampling starts.

    "official" (K = N − 2), the CSG authors' ``ddim_inv.py`` (pix2pix-zero scheduler with
    ``reverse=True``, csg-reference.md §1): t runs over the ascending timesteps without the
    first and last one (SD-v1: r+1, 2r+1, …, (N−2)r+1); the UNet sees t and the step maps
    ᾱ[t − 1] → ᾱ[t + r − 1]. The result sits at ᾱ[(N−1)r] (one schedule index below the
    sampler's first timestep (N−1)r + 1), and the clean latent is treated as if it were at
    ᾱ[r]. The official code always uses the epsilon formula; here the config's
    prediction_type is applied (identical for epsilon models).
    """
    asc = schedule.timesteps[::-1]
    if variant == "standard":
        return asc, alpha_at(schedule, schedule.prev_timesteps[::-1]), alpha_at(schedule, asc)
    if variant == "official":
        ts = asc[1:-1]
        return ts, alpha_at(schedule, ts - 1), alpha_at(schedule, ts + schedule.step_ratio - 1)
    raise ConfigError(f"inversion variant {variant!r} is not supported (supported: {', '.join(INVERSION_VARIANTS)})")


# --------------------------------------------------------------------------------------
# CSG and training helpers
# --------------------------------------------------------------------------------------


def gamma(alpha_t: jax.Array, alpha_prev: jax.Array) -> jax.Array:
    """CSG Eq. 6: γ_t = √(ᾱ_prev/ᾱ_t) − √((1−ᾱ_prev)/(1−ᾱ_t)), elementwise (any shape).

    With it an epsilon DDIM step reads x_prev = √(ᾱ_prev/ᾱ_t)·x_t − √(1−ᾱ_t)·γ_t·ε̂ (CSG Eq. 4);
    CSG scales its guidance term −γ_t·Ω_t·(x_t^tgt − x_t^src) by it (Eq. 18).
    """
    return jnp.sqrt(alpha_prev / alpha_t) - jnp.sqrt((1 - alpha_prev) / (1 - alpha_t))


def add_noise(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (DDPM Eq. 4); t: int scalar or (B,) for x0 (B, ...).
    Matches ``DDIMScheduler.add_noise`` for 0 ≤ t < T."""
    a = _bcast(alpha_at(schedule, t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def velocity(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target v_t = √ᾱ_t·ε − √(1−ᾱ_t)·x_0; shapes as :func:`add_noise`.
    Matches ``DDIMScheduler.get_velocity``."""
    a = _bcast(alpha_at(schedule, t), x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
