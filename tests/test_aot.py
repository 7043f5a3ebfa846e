"""Accelerator readiness on the CPU: the AOT report's logic, memory-bounded attention, runtime settings.

The deviceless TPU / CUDA compiles need their toolchains (``pip install -e ".[aot-tpu,aot-cuda]"``);
without them those tests are skipped with the reason (CI does not install them).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax import aot, runtime
from csg_jax.models import attention as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- largest batch: affine-guided bisection -----------------------------------------------------------

def _counting(fn):
    calls = []

    def need(b):
        calls.append(b)
        return fn(b)

    return need, calls


@pytest.mark.parametrize("base,per,budget", [(10, 3, 100), (1000, 7, 1000 + 7 * 37), (5, 50, 6), (0, 1, 4096)])
def test_largest_batch_affine_memory_is_exact_in_few_compiles(base, per, budget):
    need, calls = _counting(lambda b: base + per * b)
    best, seen = aot.largest_batch(need, budget, start=1, limit=4096)
    expected = min(4096, (budget - base) // per) if base + per <= budget else 0
    assert best == expected
    if expected:
        assert seen[best] <= budget and (best == 4096 or base + per * (best + 1) > budget)
        assert len(calls) <= 4  # start, the prediction, the prediction + 1 (+1 at most)


def test_largest_batch_nonlinear_and_failing_compiles():
    # convex memory (the affine prediction overshoots) and a compiler that fails above 40
    need, calls = _counting(lambda b: None if b > 40 else 100 + b * b)
    for budget in (100 + 30 * 30, 100 + 30 * 30 + 60, 10**9):
        best, _ = aot.largest_batch(need, budget, start=1, limit=512)
        brute = max(b for b in range(1, 513) if (b <= 40 and 100 + b * b <= budget))
        assert best == brute
    assert len(calls) < 3 * 12  # logarithmic, not a scan


def test_largest_batch_start_too_big_limit_and_known_points():
    assert aot.largest_batch(lambda b: 10 * b, 5, start=1)[0] == 0
    best, seen = aot.largest_batch(lambda b: b, 10**9, start=1, limit=64)
    assert best == 64
    need, calls = _counting(lambda b: 2 * b)
    best, _ = aot.largest_batch(need, 100, start=4, known={4: 8, 8: 16})
    assert best == 50 and 4 not in calls and 8 not in calls


def test_fit_decision_counts_arguments_outputs_temps_less_aliases():
    r = aot.CompileResult("p", "t", 1, True, argument_bytes=60, output_bytes=10, alias_bytes=10, temp_bytes=20)
    assert r.total_bytes == 80
    assert aot.fits(r, 100, 0.8) and not aot.fits(r, 100, 0.79)
    assert not aot.fits(aot.CompileResult("p", "t", 1, False), 10**12, 1.0)


def test_largest_buffers_reads_xla_buffer_assignment(tmp_path):
    text = """BufferAssignment:
allocation 0: size 600, parameter 0, shape |f32[150]| at ShapeIndex {}:
 value: <1 p.1 @0> (size=600,offset=0): f32[150]{0}
allocation 1: size 5000, preallocated-temp:
 value: <2 fusion.3 @0> (size=4000,offset=0): f32[1000]{0}
 value: <3 dot.7 @0> (size=800,offset=4000): bf16[400]{0}
 value: <4 small @0> (size=8,offset=4800): f32[2]{0}
allocation 2: size 64, output shape is |f32[16]|, maybe-live-out:
 value: <5 out @0> (size=64,offset=0): f32[16]{0}

Total bytes used: 5664
"""
    (tmp_path / "module_0001.jit_f.sm_9.0a_gpu_after_optimizations-buffer-assignment.txt").write_text(text)
    top = aot.largest_buffers(str(tmp_path), top=2)
    assert top == [(4000, "fusion.3", "f32[1000]{0}"), (800, "dot.7", "bf16[400]{0}")]  # parameters left out


# -- memory-bounded attention --------------------------------------------------------------------

def test_query_chunk_is_the_largest_divisor_within_budget():
    assert A.query_chunk(2, 8, 4096, 77) == 4096  # small: no chunking
    c = A.query_chunk(96, 8, 4096, 4096)
    assert 4096 % c == 0 and 96 * 8 * c * 4096 <= A.LOGITS_BUDGET < 96 * 8 * 2 * c * 4096
    assert A.query_chunk(1, 1, 12, 10, budget=45) == 4  # 5 would fit but does not divide 12
    assert A.query_chunk(1, 1, 7, 10, budget=5) == 1


def _reference_attention(q, k, v, scale):
    s = np.einsum("bqnd,btnd->bnqt", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqt,btnd->bqnd", p, v), p


def test_chunked_attention_equals_the_softmax_formula(monkeypatch):
    r = np.random.RandomState(0)
    q, k, v = (r.randn(2, 24, 3, 8).astype(np.float32) for _ in range(3))
    ref, _ = _reference_attention(q, k, v, 8**-0.5)
    monkeypatch.setattr(A, "LOGITS_BUDGET", 2 * 3 * 6 * 24)  # 4 chunks of 6 query rows
    assert A.query_chunk(2, 3, 24, 24) == 6
    out = jax.jit(A.fused_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)


def test_chunked_controlled_attention_equals_unchunked(monkeypatch):
    """Records, mixing and injection computed per query chunk equal the whole-layer computation."""
    r = np.random.RandomState(1)
    b, q_len, dim, t, heads = 2, 16, 12, 5, 3
    layer = A.Attention(dim, heads, dim // heads, layer_name="x")
    x = jnp.asarray(r.randn(b, q_len, dim), jnp.float32)
    ctx = jnp.asarray(r.randn(b, t, 7), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x, ctx)
    inject = jnp.asarray(r.dirichlet(np.ones(t), (b, heads, q_len)), jnp.float32)
    controls = {
        "probs": A.AttentionControl(record=(("x", "probs"),)),
        "head_mean": A.AttentionControl(record=(("x", "head_mean"),), inject={"x": inject}),
        "token_mean+mix": A.AttentionControl(
            record=(("x", "token_mean"),), token_columns=jnp.asarray([[1, 2], [3, 3]], jnp.int32),
            mix={"x": jnp.asarray(r.rand(b, q_len), jnp.float32)}, mix_ref_rows=jnp.asarray([1, 0], jnp.int32),
            mix_ref_columns=jnp.asarray([[0, 1, 2, 4, 3], [0, 1, 2, 3, 4]], jnp.int32), record_live=True),
    }
    apply = jax.jit(lambda p, c: layer.apply(p, x, ctx, c))
    for name, control in controls.items():
        whole = apply(params, control)
        monkeypatch.setattr(A, "LOGITS_BUDGET", b * heads * 4 * t)  # 4 chunks of 4 rows
        chunked = jax.jit(lambda p, c: layer.apply(p, x, ctx, c))(params, control)
        monkeypatch.undo()
        for w, c in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
            np.testing.assert_allclose(np.asarray(c), np.asarray(w), atol=1e-6, err_msg=name)


# -- the report on the CPU backend ----------------------------------------------------------------

def test_report_on_cpu_compiles_programs_and_finds_the_largest_batch(tmp_path):
    """The script end to end with the tiny model: table, JSON, and a max batch that is the
    boundary of the fit decision (its own compile fits, the next batch's does not)."""
    out = tmp_path / "aot.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "aot_report.py"), "--target", "cpu", "--memory-gib", "0.1",
           "--model", "tiny", "--size", "32", "--steps", "3", "--dtype", "float32", "--param-dtype", "float32",
           "--programs", "invert,edit:csg", "--max-batch", "--batch-limit", "64", "--chips", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "program" in proc.stdout and "edit:csg" in proc.stdout and "invert" in proc.stdout
    report = json.loads(out.read_text())
    budget = 0.9 * 0.1 * aot.GIB
    for row in report["results"]:
        assert row["ok"] and row["temp_bytes"] > 0 and row["argument_bytes"] > 0
        best, seen = row["max_batch"], {int(b): v for b, v in row["bisection"].items()}
        assert 1 <= best < 64
        assert seen[best] <= budget
        assert best + 1 in seen and (seen[best + 1] is None or seen[best + 1] > budget)
        assert row["bytes_per_image"] > 0


def test_report_refuses_bad_settings():
    script = os.path.join(ROOT, "scripts", "aot_report.py")
    for args, msg in ((["--target", "cpu"], "--memory-gib"), (["--programs", "edit:nope"], "unknown program"),
                      (["--usable", "1.5"], "--usable")):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr


def _has(module):
    return importlib.util.find_spec(module) is not None


def test_direct_inversion_programs_take_and_give_the_latents_of_every_step():
    """invert-direct returns (x_T, the N latents) and edit-direct:<method> takes them (lowered only:
    tracing, no compile); the latents are the one extra argument over the standard edit."""
    pipe = aot.abstract_pipeline(aot.model_configs("tiny"), jnp.float32, jnp.float32)
    setting = aot.Setting(size=32, steps=3, dtype="float32", param_dtype="float32")
    path = (3, 1, 16, 16, 4)  # (N, B, h, w, C): the tiny VAE halves the 32 px side
    fn, args = aot.build_program("invert-direct", pipe, setting, 1, jax.devices())
    x_T, steps = fn.lower(*args).out_info
    assert x_T.shape == (1, 16, 16, 4) and steps.shape == path
    shapes = lambda program: [a.shape for a in jax.tree.leaves(aot.build_program(program, pipe, setting, 1,
                                                                                  jax.devices())[1])]
    direct, standard = shapes("edit-direct:p2p"), shapes("edit:p2p")
    assert direct[-1] == path and direct[:-1] == standard
    fn, args = aot.build_program("edit-direct:p2p", pipe, setting, 1, jax.devices())
    assert fn.lower(*args).out_info["edited"].shape == (1, 16, 16, 4)


@pytest.mark.parametrize("target,module", [("v5e", "libtpu"), ("h100", "jax_cuda12_plugin")])
def test_deviceless_compile_of_the_tiny_edit(target, module, tmp_path):
    if not _has(module):
        pytest.skip(f"no {target} toolchain here ({aot.INSTALL_HINT[aot.TARGETS[target].platform]})")
    out = tmp_path / "aot.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "aot_report.py"), "--target", target, "--model", "tiny",
           "--size", "32", "--steps", "3", "--programs", "edit:csg", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads(out.read_text())["results"][0]
    assert row["ok"] and row["fits"] and row["temp_bytes"] > 0


# -- runtime settings --------------------------------------------------------------------------------

def test_gpu_flags_are_added_once_and_never_override_the_users(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    flags = runtime.add_xla_flags()
    assert flags.split() == ["--xla_cpu_multi_thread_eigen=true", "--xla_gpu_enable_triton_gemm=false"]
    assert runtime.add_xla_flags() == flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    assert runtime.add_xla_flags() == "--xla_gpu_enable_triton_gemm=true"


def test_compile_cache_folder_choice(monkeypatch, tmp_path):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        assert runtime.configure(str(tmp_path / "c")) == str(tmp_path / "c") and (tmp_path / "c").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert runtime.configure() == str(tmp_path / "env")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("CSG_JAX_HOME", str(tmp_path / "home"))
        assert runtime.configure() == str(tmp_path / "home" / "xla-cache")
        assert runtime.configure(use_cache=False) is None and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[2])


def test_second_translate_run_loads_every_program_from_the_compile_cache(tmp_path):
    """The demo twice with --compile-cache: the first run stores the editing programs, the second
    finds all of them (it writes no new entry: JAX writes only on a miss)."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "csg_jax.translate", "--demo", "--steps", "3", "--quiet", "--compile-cache", str(cache)]
    listings = []
    for i in range(2):
        proc = subprocess.run(cmd + ["--out", str(tmp_path / f"out{i}")], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        listings.append(sorted(os.listdir(cache)))
    assert any(n.startswith("jit__edit_impl") for n in listings[0]) and any(n.startswith("jit__invert_impl")
                                                                           for n in listings[0])
    assert listings[1] == listings[0]


def test_markdown_table_marks_the_search_limit_and_what_does_not_fit(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import aot_report

    g = aot.GIB
    base = dict(target="h100", ok=True, argument_bytes=g, output_bytes=0, temp_bytes=g, total_bytes=2 * g)
    rows = [dict(base, program="edit:csg", batch=1, fits=True, max_batch=256, bytes_per_image=g // 4),
            dict(base, program="invert", batch=1, fits=True, max_batch=40),
            dict(base, program="decode", batch=8, fits=False),
            dict(program="null-text", target="h100", batch=1, ok=False)]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"results": rows}))
    table = aot_report.markdown_table(aot_report.merge_reports([str(report)]), limit=256)
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["invert", "null-text", "edit:csg", "decode"]
    assert "| >= 256 | 0.25 |" in table and "| 40 |" in table
    assert "**no**" in lines[-1] and "does not compile" in lines[3]
