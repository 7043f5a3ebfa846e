"""Process-wide JAX settings the csg_jax commands apply before their first use of a device.

* **XLA flags for NVIDIA GPUs** (:data:`GPU_XLA_FLAGS`): ``--xla_gpu_enable_triton_gemm=false``.
  XLA's GPU compiler fuses the attention output's reshape into the following projection
  (``attn*/to_out_0``) as a Triton GEMM and, without autotuning, finds no tile sizes for it
  ("Couldn't find output tile sizes that satisfy hlo"): the CSG edit program did not compile for
  an H100 in fp32 or bf16. With the flag those dots go to cuBLAS. Flags are added to
  ``XLA_FLAGS`` unless the user's ``XLA_FLAGS`` already names them; other backends ignore them.
* **Persistent compilation cache**: compiled programs are stored under ``--compile-cache DIR``
  (default ``$CSG_JAX_HOME/xla-cache`` or ``~/.cache/csg_jax/xla-cache``; an already set
  ``JAX_COMPILATION_CACHE_DIR`` wins over the default), so a second run with the same shapes
  loads them instead of compiling. ``--no-compile-cache`` turns it off.

JAX reads ``XLA_FLAGS`` when its backend starts (the first array or device query), so
:func:`configure` must run before that; importing JAX is fine.
"""

from __future__ import annotations

import os
from typing import Optional

GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# the same, as per-compile options (deviceless AOT compiles pass them to .compile())
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def default_cache_dir() -> str:
    home = os.environ.get("CSG_JAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "csg_jax")
    return os.path.join(home, "xla-cache")


def add_xla_flags(flags=GPU_XLA_FLAGS) -> str:
    """``XLA_FLAGS`` with each of ``flags`` appended unless a flag of that name is already set."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")


def configure(compile_cache: Optional[str] = None, use_cache: bool = True) -> Optional[str]:
    """Apply the GPU flags and set up the persistent compilation cache; returns the cache folder
    (None when off). ``compile_cache``: a folder, else the environment's or the default one."""
    add_xla_flags()
    import jax

    if not use_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home must not stop an edit
        import sys

        print(f"note: compilation cache off ({folder}: {e.strerror})", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # the editing programs compile in seconds to minutes; cache everything but trivial programs
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def add_cli_arguments(parser) -> None:
    """``--compile-cache DIR`` / ``--no-compile-cache`` on a command's parser."""
    parser.add_argument("--compile-cache", metavar="DIR",
                        help=f"persistent XLA compilation cache: a second run with the same shapes skips "
                             f"compiling (default: {default_cache_dir()})")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not read or write the compilation cache")


def configure_from_args(args) -> Optional[str]:
    return configure(getattr(args, "compile_cache", None), not getattr(args, "no_compile_cache", False))
