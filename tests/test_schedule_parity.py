"""Parity of csg_jax.schedule with diffusers' DDIMScheduler / DDIMInverseScheduler (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from csg_jax import schedule as S
from csg_jax.errors import ConfigError

# As shipped in runwayml/stable-diffusion-v1-5 (the CSG default) ...
SD1 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# ... and stabilityai/stable-diffusion-2-1 (768 px, v-prediction).
SD2 = {**SD1, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
CONFIGS = {
    "sd1": SD1,
    "sd2_v": SD2,
    "sd1_sample": {**SD1, "prediction_type": "sample"},
    # The cosine schedule of the shipped shapes model (pixel space, v-prediction).
    "cosine_v": {**SD2, "beta_schedule": "squaredcos_cap_v2"},
    "linear_alpha1": {**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "set_alpha_to_one": True, "steps_offset": 0},
}
SHAPE = (2, 4, 4, 4)  # NHWC latents
TOL = 1e-5


def _assert_close_traj(ours, ref_list):
    """max |ours − ref| <= 1e-5 · max(1, max |ref|): fp32 error scales with magnitude, and with
    the fake model x̂_0 = (x − √(1−ᾱ)ε̂)/√ᾱ reaches O(10–300) at ᾱ ≈ 5e-3…4e-5 (observed relative
    errors are ~1e-6; SD-like configs stay O(1–25))."""
    ref = np.stack(ref_list)
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= TOL * max(1.0, float(np.abs(ref).max())), (err, np.abs(ref).max())


def _diffusers(cls, cfg, n):
    torch.set_num_threads(1)
    sched = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(n)
    return sched


def _ours(cfg, n):
    return S.make_schedule(S.SchedulerConfig.from_dict(cfg), n)


def _fake_model_np_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    c = rng.uniform(0, 2 * np.pi, SHAPE).astype(np.float32)
    return x, c


def _fake_jax(x, t, c):
    return 0.1 * x + jnp.sin(t.astype(jnp.float32) * 0.01 + c)


def _fake_torch(x, t, c):
    return 0.1 * x + torch.sin(torch.as_tensor(t, dtype=torch.float32) * 0.01 + c)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@jax.jit
def _run_sampling(sched, x, c):
    def body(x, xs):
        t, a_t, a_prev = xs
        out = _fake_jax(x, t, c)
        x_new = S.ddim_step(sched, out, t, x)
        x_alt = S.ddim_transfer(out, x, a_t, a_prev, sched.prediction_type)
        return x_new, (x_new, x_alt)

    return jax.lax.scan(body, x, S.sampling_plan(sched))[1]


@jax.jit
def _run_inversion(sched, x, c, ts, a_from, a_to):
    def body(x, xs):
        t, a0, a1 = xs
        x = S.ddim_inversion_step(sched, _fake_jax(x, t, c), a0, a1, x)
        return x, x

    return jax.lax.scan(body, x, (ts, a_from, a_to))[1]


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod_bitwise(name):
    cfg = CONFIGS[name]
    ref = _diffusers(DDIMScheduler, cfg, 50)
    ours = _ours(cfg, 50)
    err = np.abs(np.asarray(ours.alphas_cumprod) - ref.alphas_cumprod.numpy()).max()
    assert err <= 1e-7, err  # bit-identical with torch 2.x CPU linspace/cumprod
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [50, 10, 30, 7, 1])
def test_timesteps_exact(spacing, n):
    cfg = {**SD1, "timestep_spacing": spacing}
    ref = _diffusers(DDIMScheduler, cfg, n)
    ours = _ours(cfg, n)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert ours.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ours.prev_timesteps), ref.timesteps.numpy() - 1000 // n)
    if spacing != "linspace":  # DDIMInverseScheduler has no linspace spacing
        inv = _diffusers(DDIMInverseScheduler, cfg, n)
        np.testing.assert_array_equal(np.asarray(S.inversion_plan(ours)[0]), inv.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [50, 10])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sampling_trajectory_matches_ddim_scheduler(name, n, spacing):
    cfg = {**CONFIGS[name], "timestep_spacing": spacing}
    x, c = _fake_model_np_inputs()
    ref = _diffusers(DDIMScheduler, cfg, n)
    xt, ct, ref_traj = _nchw(x), _nchw(c), []
    for t in ref.timesteps:
        xt = ref.step(_fake_torch(xt, t, ct), t, xt, eta=0.0).prev_sample
        ref_traj.append(_nhwc(xt))
    traj, traj_alt = _run_sampling(_ours(cfg, n), jnp.asarray(x), jnp.asarray(c))
    _assert_close_traj(traj, ref_traj)
    np.testing.assert_allclose(np.asarray(traj_alt), np.asarray(traj), atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [50, 10])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_standard_inversion_matches_ddim_inverse_scheduler(name, n, spacing):
    cfg = {**CONFIGS[name], "timestep_spacing": spacing}
    x, c = _fake_model_np_inputs(1)
    ref = _diffusers(DDIMInverseScheduler, cfg, n)
    xt, ct, ref_traj = _nchw(x), _nchw(c), []
    for t in ref.timesteps:
        xt = ref.step(_fake_torch(xt, t, ct), t, xt).prev_sample
        ref_traj.append(_nhwc(xt))
    sched = _ours(cfg, n)
    plan = S.inversion_plan(sched, "standard")
    assert plan[0].shape == (n,)
    traj = _run_inversion(sched, jnp.asarray(x), jnp.asarray(c), *plan)
    _assert_close_traj(traj, ref_traj)
    # The standard plan is the exact mirror of the sampling plan.
    ts, a_t, a_prev = S.sampling_plan(sched)
    np.testing.assert_array_equal(np.asarray(plan[0]), np.asarray(ts)[::-1])
    np.testing.assert_array_equal(np.asarray(plan[1]), np.asarray(a_prev)[::-1])
    np.testing.assert_array_equal(np.asarray(plan[2]), np.asarray(a_t)[::-1])


@pytest.mark.parametrize("n", [50, 10])
def test_official_inversion_plan_and_trajectory(n):
    """CSG ddim_inv.py: timesteps.flip(0)[1:-1], pix2pix-zero step(reverse=True):
    a_t = ᾱ[t−1], a_next = ᾱ[t+r−1], epsilon formula."""
    r = 1000 // n
    sched = _ours(SD1, n)
    ts, a_from, a_to = S.inversion_plan(sched, "official")
    np.testing.assert_array_equal(np.asarray(ts), r * np.arange(1, n - 1) + 1)
    ac = np.asarray(sched.alphas_cumprod)
    np.testing.assert_array_equal(np.asarray(a_from), ac[np.asarray(ts) - 1])
    np.testing.assert_array_equal(np.asarray(a_to), ac[np.asarray(ts) + r - 1])
    assert float(a_to[-1]) == ac[(n - 1) * r]  # one index below the sampler's start ᾱ[(N−1)r+1]
    assert int(sched.timesteps[0]) == (n - 1) * r + 1

    x, c = _fake_model_np_inputs(2)
    ref = _diffusers(DDIMScheduler, SD1, n)
    ac_t = ref.alphas_cumprod
    xt, ct, ref_traj = _nchw(x), _nchw(c), []
    for t in ref.timesteps.flip(0)[1:-1]:
        e = _fake_torch(xt, t, ct)
        a_t, a_next = ac_t[t - 1], ac_t[t + r - 1]
        x0 = (xt - (1 - a_t) ** 0.5 * e) / a_t.sqrt()
        xt = a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * e
        ref_traj.append(_nhwc(xt))
    traj = _run_inversion(sched, jnp.asarray(x), jnp.asarray(c), ts, a_from, a_to)
    assert traj.shape == (n - 2,) + SHAPE
    _assert_close_traj(traj, ref_traj)


def test_gamma_closed_form_and_eq4():
    sched = _ours(SD1, 50)
    ts, a_t, a_prev = S.sampling_plan(sched)
    a64, p64 = np.asarray(a_t, np.float64), np.asarray(a_prev, np.float64)
    ref = np.sqrt(p64 / a64) - np.sqrt((1 - p64) / (1 - a64))
    np.testing.assert_allclose(np.asarray(S.gamma(a_t, a_prev)), ref, rtol=1e-5, atol=1e-6)
    # CSG Eq. 4: x_prev = sqrt(a_prev/a_t) x_t − sqrt(1−a_t) γ_t ε (epsilon DDIM step).
    x, eps = (jnp.asarray(v) for v in _fake_model_np_inputs(3))
    for i in (0, 25, 49):
        g = S.gamma(a_t[i], a_prev[i])
        eq4 = jnp.sqrt(a_prev[i] / a_t[i]) * x - jnp.sqrt(1 - a_t[i]) * g * eps
        np.testing.assert_allclose(np.asarray(S.ddim_step(sched, eps, ts[i], x)), np.asarray(eq4), atol=TOL)


@pytest.mark.parametrize("name", ["sd1", "sd2_v", "sd1_sample"])
def test_step_then_inversion_is_identity_with_exact_targets(name):
    """x_t built from (x0, ε); the exact model target at each point moves DDIM along the
    same (x0, ε) line, so step then invert returns x_t (and lands on add_noise in between)."""
    sched = _ours(CONFIGS[name], 50)
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)

    def target(t):
        return {"epsilon": eps, "sample": x0, "v_prediction": S.velocity(sched, x0, eps, t)}[sched.prediction_type]

    ts, a_t, a_prev = S.sampling_plan(sched)
    for i in (0, 10, 48):
        t, tp = ts[i], ts[i] - sched.step_ratio
        x_t = S.add_noise(sched, x0, eps, t)
        x_prev = S.ddim_step(sched, target(t), t, x_t)
        np.testing.assert_allclose(np.asarray(x_prev), np.asarray(S.add_noise(sched, x0, eps, tp)), atol=TOL)
        back = S.ddim_inversion_step(sched, target(tp), a_prev[i], a_t[i], x_prev)
        np.testing.assert_allclose(np.asarray(back), np.asarray(x_t), atol=TOL)


def test_add_noise_and_velocity_match_diffusers():
    ref = _diffusers(DDIMScheduler, SD2, 50)
    sched = _ours(SD2, 50)
    x0, noise = _fake_model_np_inputs(5)
    t = np.array([3, 999], np.int64)
    ours_n = S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    ours_v = S.velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    ref_n = ref.add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t))
    ref_v = ref.get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t))
    np.testing.assert_allclose(np.asarray(ours_n), _nhwc(ref_n), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_v), _nhwc(ref_v), atol=1e-6)


def test_alpha_at_negative_and_batched():
    sched = _ours(SD1, 50)
    t = jnp.array([[-19, 0], [981, 999]])
    got = np.asarray(S.alpha_at(sched, t))
    ac = np.asarray(sched.alphas_cumprod)
    np.testing.assert_array_equal(got, np.array([[ac[0], ac[0]], [ac[981], ac[999]]]))


def test_config_from_dict_fields():
    cfg = S.SchedulerConfig.from_dict(SD2)
    assert cfg == S.SchedulerConfig(1000, 0.00085, 0.012, "scaled_linear", 1, False, "v_prediction", "leading")


@pytest.mark.parametrize(
    "patch",
    [
        {"beta_schedule": "exp_typo"},
        {"prediction_type": "flow"},
        {"timestep_spacing": "karras"},
        {"clip_sample": True},
        {"thresholding": True},
        {"rescale_betas_zero_snr": True},
        {"trained_betas": [0.1] * 1000},
        {"steps_offset": -1},
        {"beta_start": 0.5, "beta_end": 0.1},
        {"num_train_timesteps": 0},
    ],
)
def test_config_errors(patch):
    with pytest.raises(ConfigError):
        S.SchedulerConfig.from_dict({**SD1, **patch})


def test_schedule_errors():
    cfg = S.SchedulerConfig.from_dict(SD1)
    for n in (0, 1001):
        with pytest.raises(ConfigError):
            S.make_schedule(cfg, n)
    with pytest.raises(ConfigError):
        S.inversion_plan(S.make_schedule(cfg, 10), "p2p")
    with pytest.raises(ConfigError):
        S.predict_eps_and_x0(jnp.zeros(3), jnp.zeros(3), 0.5, "flow")
