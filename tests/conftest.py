"""Shared fixtures: tiny model folders and loaded pipelines, made once per test session.

JAX compile time dominates small tests, so the expensive objects (pipelines and the jitted
functions hanging off them) are session-scoped and shapes are kept few.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# One persistent compilation cache for the session (this process, the pytest-xdist workers and
# the CLIs they start all inherit it): many tests build their own pipeline or run a CLI, and equal
# programs then compile once. Set before JAX is imported, which reads these at import; removed when
# the session ends, by the process that made it (the xdist controller, not a worker).
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="csg_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest

from csg_jax.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_sd1")), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_sd2")), "sd2", seed=1)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_sd1_dir):
    from csg_jax.pipeline import load_pipeline

    return load_pipeline(tiny_sd1_dir)


@pytest.fixture(scope="session")
def tiny_sd2(tiny_sd2_dir):
    from csg_jax.pipeline import load_pipeline

    return load_pipeline(tiny_sd2_dir)


@pytest.fixture(scope="session")
def pipe(tiny_sd1):
    """The tiny SD-1 pipeline the editing tests share (16x16 latents for 32x32 images)."""
    return tiny_sd1


@pytest.fixture(scope="session")
def x_T():
    """The inverted latent every edit starts from, (1, 16, 16, 4) (a seeded Gaussian stands in
    for DDIM inversion)."""
    import jax

    return jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4))


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
