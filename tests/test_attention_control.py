"""AttentionControl through the whole tiny SD-1 UNet: record, inject, mix, jit and scan.

Every UNet call here goes through one ``jax.jit``-ed function that takes the control as an
argument, at one input shape (latents (2, 16, 16, 4)). Distinct control *structures* (which
layers record what, which layers are injected / mixed) each compile once; array contents
(injected maps, weights, reference rows) never recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.models.attention import AttentionControl
from csg_jax.models.unet import attention_layers

B, HW = 2, (16, 16)
PROMPTS = ["a photo of a cat sitting on the grass", "a red circle on a blue background"]


class _Unet:
    """The tiny pipeline's UNet, jitted once with the control as an argument; counts traces."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.traces = 0

        def call(params, x, t, ctx, control):
            self.traces += 1
            return pipe.unet.apply({"params": params}, x, t, ctx, control)

        self._call = jax.jit(call)
        rs = np.random.RandomState(0)
        self.x = jnp.asarray(rs.randn(B, *HW, 4).astype(np.float32))
        self.t = jnp.asarray([981, 21], jnp.int32)
        self.ctx = pipe.embed(PROMPTS)
        self.layers = attention_layers(pipe.unet.config, HW)
        self.cross = [l.name for l in self.layers if l.kind == "cross"]
        self.self_ = [l.name for l in self.layers if l.kind == "self"]
        self.heads = pipe.unet.config.attention_head_dim[0]

    def __call__(self, control=None, x=None, t=None):
        x = self.x if x is None else x
        t = self.t if t is None else t
        out, rec = self._call(self.pipe.params["unet"], x, t, self.ctx, control)
        return np.asarray(out), {k: np.asarray(v) for k, v in rec.items()}


@pytest.fixture(scope="module")
def unet(tiny_sd1):
    return _Unet(tiny_sd1)


@pytest.fixture(scope="module")
def plain(unet):
    """Output without a control (fused attention)."""
    out, rec = unet(None)
    assert rec == {}
    return out


@pytest.fixture(scope="module")
def recorded(unet):
    """(output, records) with every layer (self and cross) recording full probabilities."""
    return unet(AttentionControl(record=tuple((l.name, "probs") for l in unet.layers)))


# Two *different* compiled programs of the same math (e.g. mixing vs injecting) differ by float
# rounding (~3e-6 here); injecting the very probabilities a layer recorded is exact to 1e-6.
TOL_PROGRAMS = 1e-5


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# -- (a) + (f): what comes back ----------------------------------------------------------------
def test_recorded_probs_shapes_and_rows(unet, recorded):
    _, rec = recorded
    res = {l.name: l.resolution for l in unet.layers}
    for name in unet.cross:
        h, w = res[name]
        assert rec[name].shape == (B, unet.heads, h * w, 77), name
    for name in unet.self_:
        h, w = res[name]
        assert rec[name].shape == (B, unet.heads, h * w, h * w), name
    for name, p in rec.items():
        assert np.all(p >= 0), name
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5, err_msg=name)


def test_attention_layers_match_record_keys(unet, recorded):
    _, rec = recorded
    names = [l.name for l in unet.layers]
    assert len(names) == len(set(names))
    assert set(names) == set(rec)
    assert len(unet.cross) == len(unet.self_) == 7  # 2 down + 1 mid + 4 up transformer blocks
    for l in unet.layers:
        assert l.name.endswith(".attn2" if l.kind == "cross" else ".attn1")
        assert l.resolution[0] * l.resolution[1] == rec[l.name].shape[2], l
        if l.kind == "self":
            assert rec[l.name].shape[3] == rec[l.name].shape[2]


def test_recording_does_not_change_the_output(plain, recorded):
    # explicit softmax path vs fused dot_product_attention
    assert _diff(recorded[0], plain) <= TOL_PROGRAMS


# -- (d): the tiny model's maps carry signal ----------------------------------------------------
def test_maps_are_not_uniform(unet, recorded):
    _, rec = recorded
    for name in unet.cross:
        row_max = rec[name].max(-1)  # (B, N, Q)
        assert row_max.mean() > 5 / 77, (name, row_max.mean())
        assert np.median(row_max) > 3 / 77, (name, np.median(row_max))
        # different pixels attend to different tokens
        assert rec[name].std(axis=2).mean() > 1e-3, name


# -- (a) summaries + (b) injection ----------------------------------------------------------------
def _inject_control(unet, inject):
    """Inject maps into every cross layer; record summaries of every layer (one structure)."""
    record = []
    for i, name in enumerate(unet.cross):
        record.append((name, "head_mean" if i % 2 == 0 else "token_mean"))
    record += [(name, "head_mean") for name in unet.self_]
    cols = jnp.asarray([[1, 2, 5], [3, 0, 76]], jnp.int32)
    return AttentionControl(record=tuple(record), token_columns=cols, inject=inject), np.asarray(cols)


@pytest.fixture(scope="module")
def injected(unet, recorded):
    out_rec, rec = recorded
    control, cols = _inject_control(unet, {n: jnp.asarray(rec[n]) for n in unet.cross})
    out, summaries = unet(control)
    return out, summaries, cols


def test_injecting_own_probs_reproduces_output(recorded, injected):
    assert _diff(injected[0], recorded[0]) <= 1e-6


def test_summaries_equal_reductions_of_probs(unet, recorded, injected):
    _, rec = recorded
    _, summaries, cols = injected
    assert set(summaries) == set(rec)
    for i, name in enumerate(unet.cross):
        p = rec[name]
        if i % 2 == 0:
            want = p.mean(axis=1)
        else:
            want = np.take_along_axis(p, cols[:, None, None, :], axis=-1).mean(axis=1)
            assert summaries[name].shape == (B, p.shape[2], cols.shape[1])
        np.testing.assert_allclose(summaries[name], want, atol=1e-6, err_msg=name)
    for name in unet.self_:
        # self layers are computed, not injected: same math in another program
        np.testing.assert_allclose(summaries[name], rec[name].mean(axis=1), atol=TOL_PROGRAMS, err_msg=name)


def test_injecting_other_probs_changes_output_without_recompiling(unet, recorded, injected):
    out_rec, rec = recorded
    traces = unet.traces
    uniform = {n: jnp.full(rec[n].shape, 1 / 77, jnp.float32) for n in unet.cross}
    out_u, sum_u = unet(_inject_control(unet, uniform)[0])
    perm = np.random.RandomState(1).permutation
    shuffled = {n: jnp.asarray(rec[n][:, :, perm(rec[n].shape[2])]) for n in unet.cross}
    out_p, _ = unet(_inject_control(unet, shuffled)[0])
    assert unet.traces == traces, "array-valued control fields must not retrace"
    scale = np.abs(out_rec).max()
    for out in (out_u, out_p):
        assert _diff(out, out_rec) > 1e-3 * scale
    # the recorded maps are the injected ones
    np.testing.assert_allclose(sum_u[unet.cross[0]], 1 / 77, atol=1e-7)


# -- (c) mixing -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mix_fn(unet):
    def run(weight: float, ref_rows):
        q = {l.name: l.resolution[0] * l.resolution[1] for l in unet.layers}
        control = AttentionControl(
            mix={n: jnp.full((B, q[n]), weight, jnp.float32) for n in unet.cross},
            mix_ref_rows=jnp.asarray(ref_rows, jnp.int32),
            mix_ref_columns=jnp.tile(jnp.arange(77, dtype=jnp.int32), (B, 1)),
        )
        return unet(control)[0]

    return run


def test_mix_weight_one_is_no_control(unet, plain, recorded, mix_fn):
    out = mix_fn(1.0, [1, 0])
    assert _diff(out, recorded[0]) <= TOL_PROGRAMS
    assert _diff(out, plain) <= TOL_PROGRAMS


def test_mix_weight_zero_equals_injecting_the_reference_row(unet, recorded, mix_fn):
    _, rec = recorded
    out_mix = mix_fn(0.0, [1, 1])  # row 0 takes row 1's maps; row 1 keeps its own
    control, _ = _inject_control(unet, {n: jnp.asarray(rec[n][[1, 1]]) for n in unet.cross})
    out_inj, _ = unet(control)
    assert _diff(out_mix, out_inj) <= TOL_PROGRAMS
    assert _diff(out_mix[1], recorded[0][1]) <= TOL_PROGRAMS
    assert _diff(out_mix[0], recorded[0][0]) > 1e-3 * np.abs(recorded[0]).max()


# -- (e) jit + scan ---------------------------------------------------------------------------------
def test_scan_carrying_records(unet, recorded):
    pipe = unet.pipe
    _, rec = recorded
    control = AttentionControl(record=tuple((n, "probs") for n in unet.cross))
    ts = jnp.asarray([[981, 981], [21, 21]], jnp.int32)

    @jax.jit
    def run(x, ctl):
        init = {n: jnp.zeros_like(rec[n]) for n in unet.cross}

        def body(carry, t):
            x, _ = carry
            eps, r = pipe.unet.apply({"params": pipe.params["unet"]}, x, t, unet.ctx, ctl)
            return (x - 0.1 * eps, r), r[unet.cross[0]].max()

        return jax.lax.scan(body, (x, init), ts)

    (x_end, last), per_step = run(unet.x, control)
    # the same two steps, one call each of the already-compiled record-everything function
    record_all = AttentionControl(record=tuple((l.name, "probs") for l in unet.layers))
    eps, _ = unet(record_all, t=ts[0])
    x_ref = np.asarray(unet.x) - 0.1 * eps
    eps, r_ref = unet(record_all, x=jnp.asarray(x_ref), t=ts[1])
    x_ref = x_ref - 0.1 * eps
    assert set(last) == set(unet.cross)
    assert per_step.shape == (2,)
    # two programs, two steps: rounding differences grow a little (seen: 1.2e-5 on probabilities)
    assert _diff(x_end, x_ref) <= 5e-5
    for n in unet.cross:
        assert _diff(last[n], r_ref[n]) <= 1e-4, n
        np.testing.assert_allclose(np.asarray(last[n]).sum(-1), 1.0, atol=1e-5)
