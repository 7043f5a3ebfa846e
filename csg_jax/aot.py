"""Ahead-of-time compilation for accelerators that are not here: memory of every program per chip.

JAX compiles for a TPU (``libtpu``) or an NVIDIA GPU (the ``jax[cuda12]`` libraries and a GPU
target description) on a CPU-only machine; ``compiled.memory_analysis()`` then gives the bytes
the program needs as laid out for that chip. This module builds every program csg_jax runs
(encode, the inversions, each method's edit, decode, the dataset mode's sharded batch) from
*abstract* arguments (shapes and dtypes only: no weights are read or allocated), compiles it for
a named target, decides whether it fits the chip and finds the largest batch per chip that does.

``scripts/aot_report.py`` is the command line; :func:`compile_program` and
:func:`largest_batch` are the pieces tests use on the CPU backend.

Environment: the toolchains must be told there is no device *before* JAX is imported
(``JAX_PLATFORMS=cpu``, ``TPU_SKIP_MDS_QUERY=1``, ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``);
:func:`deviceless_environment` does that.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional, Sequence

from csg_jax import runtime

GIB = 2**30

# XLA's own spec of an H100 SXM / A100 SXM 80GB (reduced to what the compiler reads), as in
# xla/backends/gpu/target_config/specs/*.txtpb. Deviceless GPU compiles do no autotuning.
_H100 = (
    "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
    "shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
    "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
    "memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98 "
    "device_memory_size: 84942979072 shared_memory_per_block_optin: 232448 "
    "cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
    'platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 patch: 0 } '
    'device_description_str: "NVIDIA H100 80GB HBM3"'
)
_A100 = (
    "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
    "shared_memory_per_core: 167936 threads_per_core_limit: 2048 core_count: 108 fpus_per_core: 64 "
    "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
    "memory_bandwidth: 2039000000000 l2_cache_size: 41943040 clock_rate_ghz: 1.41 "
    "device_memory_size: 85198045184 shared_memory_per_block_optin: 166912 "
    "cuda_compute_capability { major: 8 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
    'platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 patch: 0 } '
    'device_description_str: "NVIDIA A100-SXM4-80GB"'
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for. ``memory_bytes``: its HBM; ``topology``: TPU slice name (n chips)."""

    name: str
    platform: str  # "tpu" | "cuda" | "cpu"
    memory_bytes: int
    topology: str = ""  # TPU: "v5e:2x2" style (the multi-chip slice the dataset program uses)
    chip_config: str = "default"  # TPU: "megacore" for v4 / v5p
    gpu_config: str = ""  # CUDA: text GpuTargetConfigProto
    description: str = ""


TARGETS = {
    "v5e": Target("v5e", "tpu", 16 * GIB, "v5e:2x2", "default", description="TPU v5e (16 GiB HBM), 4-chip slice"),
    "v5p": Target("v5p", "tpu", 95 * GIB, "v5:2x2x1", "megacore", description="TPU v5p (95 GiB HBM), 4-chip slice"),
    "v6e": Target("v6e", "tpu", 32 * GIB, "v6e:2x2", "default", description="TPU v6e (32 GiB HBM), 4-chip slice"),
    "h100": Target("h100", "cuda", 84942979072, gpu_config=_H100, description="NVIDIA H100 80GB HBM3"),
    "a100": Target("a100", "cuda", 85198045184, gpu_config=_A100, description="NVIDIA A100-SXM4 80GB"),
    "cpu": Target("cpu", "cpu", 0, description="this machine's CPU backend (memory: --memory-gib)"),
    "device": Target("device", "device", 0, description="the accelerator attached here (a real run: --run)"),
}

INSTALL_HINT = {
    "tpu": 'pip install -e ".[aot-tpu]"   (libtpu, ~210 MB)',
    "cuda": 'pip install -e ".[aot-cuda]"   (CUDA libraries, ~3.3 GB; no driver or GPU needed)',
}


class ToolchainMissing(RuntimeError):
    """The compiler for a target is not installed; the message says what to install."""


def deviceless_environment() -> None:
    """Set the variables that let libtpu / the CUDA plugin compile without their device.

    Must run before JAX is imported (JAX reads them at backend start-up)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check against
    # libtpu locks /tmp/libtpu_lockfile against a second process using the chips; compile-only
    # processes use none, so several may run side by side
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # the host traces for an accelerator: convolutions as XLA's, not the CPU lowering (models/conv.py)
    os.environ.setdefault("CSG_JAX_CONV", "xla")


def target_devices(target: Target, count: int = 1) -> list:
    """``count`` compile-only devices of ``target`` (for ``cpu``: the real CPU devices)."""
    import jax
    from jax.experimental import topologies

    if target.platform in ("cpu", "device"):
        devs = jax.devices("cpu") if target.platform == "cpu" else jax.devices()
        if len(devs) < count:
            raise ValueError(f"the CPU backend has {len(devs)} devices, {count} asked; set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
        return devs[:count]
    try:
        if target.platform == "tpu":
            dims = [int(d) for d in target.topology.split(":")[1].split("x")]
            dims += [1] * (3 - len(dims))
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
                chips_per_host_bounds=tuple(min(d, 2) for d in dims[:2]) + (1,), num_slices=1,
                wrap=(False, False, False))
        else:
            topo = topologies.get_topology_desc(platform="cuda", target_config=target.gpu_config,
                                                topology=f"1x1x{count}")
    except Exception as e:  # the plugin is absent or refuses: say what to install
        raise ToolchainMissing(f"cannot compile for {target.name} here ({type(e).__name__}: {str(e)[:200]}); "
                               f"if its toolchain is missing: {INSTALL_HINT[target.platform]}") from None
    devs = list(topo.devices)
    if len(devs) < count:
        raise ValueError(f"{target.name}: topology {target.topology or '1x1'} has {len(devs)} chips, {count} asked")
    return devs[:count]


# -- compiling one program -------------------------------------------------------------------------

@dataclasses.dataclass
class CompileResult:
    """Memory of one compiled program on one chip (bytes per chip), or why it did not compile."""

    program: str
    target: str
    batch: int
    ok: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    compile_s: float = 0.0
    error: str = ""
    largest_buffers: list = dataclasses.field(default_factory=list)  # [(bytes, name, shape)]
    device_peak_bytes: Optional[int] = None  # --run: the allocator's peak after one execution
    run_s: Optional[float] = None

    @property
    def total_bytes(self) -> int:
        """What the chip must hold while the program runs: arguments + outputs + temporaries,
        less outputs that alias (donated) arguments."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def fits(result: CompileResult, memory_bytes: int, usable: float) -> bool:
    """Compiled and within ``usable`` x the chip's memory (the rest: runtime, workspaces, fragmentation)."""
    return result.ok and result.total_bytes <= usable * memory_bytes


def compile_program(name: str, fn, args: Sequence, target_name: str, batch: int, dump: bool = True,
                    top: int = 6, options: Optional[dict] = None, run: bool = False) -> CompileResult:
    """``jit``-ted ``fn`` lowered on abstract ``args`` (ShapeDtypeStructs with shardings) and compiled.

    With ``dump``, XLA's buffer assignment is written to a temporary folder and the ``top``
    largest temporaries are kept in the result (names as in the optimised HLO). ``options``: XLA
    compiler options (what ``XLA_FLAGS`` sets in a real run). ``run`` (a real device only): execute
    once on zeros and read the allocator's peak, to hold the compiler's estimate against."""
    import time

    import numpy as np

    folder = tempfile.mkdtemp(prefix="csg_jax_aot_") if dump else None
    t0 = time.perf_counter()
    try:
        options = dict(options or {}, **({"xla_dump_to": folder, "xla_dump_hlo_as_text": True} if dump else {}))
        compiled = fn.lower(*args).compile(compiler_options=options or None)
        ma = compiled.memory_analysis()
        res = CompileResult(name, target_name, batch, True, int(ma.argument_size_in_bytes),
                            int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes),
                            time.perf_counter() - t0)
        if run:
            import jax

            zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), tuple(args))
            t1 = time.perf_counter()
            jax.block_until_ready(compiled(*zeros))
            res.run_s = time.perf_counter() - t1
            device = next(iter(jax.tree.leaves(zeros)[0].devices()))
            # the process's peak so far: run one program per process for a clean reading
            res.device_peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
            del zeros
    except Exception as e:
        msg = " ".join(str(e).split())
        res = CompileResult(name, target_name, batch, False, compile_s=time.perf_counter() - t0,
                            error=f"{type(e).__name__}: {msg[:600]}")
    if folder:
        res.largest_buffers = largest_buffers(folder, top)
        shutil.rmtree(folder, ignore_errors=True)
    return res


_VALUE = re.compile(r"^\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")


def largest_buffers(dump_folder: str, top: int = 6) -> list[tuple[int, str, str]]:
    """The ``top`` largest values XLA placed in temporary memory, from the buffer-assignment dump
    (the last module's: the program itself). [(bytes, HLO name, shape)], largest first."""
    files = sorted(glob.glob(os.path.join(dump_folder, "*buffer-assignment.txt")))
    files = [f for f in files if "after_optimizations" in f] or files
    if not files:
        return []
    values: dict[str, tuple[int, str, str]] = {}
    in_temp = False
    with open(max(files, key=os.path.getsize), errors="replace") as f:
        for line in f:
            if line.startswith("allocation "):
                in_temp = "parameter" not in line and "constant" not in line
                continue
            if not line.startswith(" value:") or not in_temp:
                if line.startswith("Total bytes used") or line.startswith("Used values"):
                    break
                continue
            m = _VALUE.match(line)
            if m:
                name, size, shape = m.group(1), int(m.group(2)), m.group(3)
                if size > values.get(name, (0,))[0]:
                    values[name] = (size, name, shape)
    return sorted(values.values(), reverse=True)[:top]


# -- the largest batch that fits --------------------------------------------------------------------

def largest_batch(need: Callable[[int], Optional[int]], budget: int, start: int = 1, limit: int = 4096,
                  known: Optional[dict] = None) -> tuple[int, dict]:
    """Largest batch b in [start, limit] with ``need(b) <= budget``, assuming need grows with b.

    ``need(b)``: bytes at batch b, or None if the program does not compile at b (treated as not
    fitting). Memory is close to affine in the batch, so each probe is the affine prediction from
    the two nearest measurements, kept strictly inside the bracket [fits, does not fit] (a
    bisection step when the prediction would not shrink it): two or three compiles usually
    suffice. Returns (b, {batch: need}); b = 0 if even ``start`` does not fit.
    """
    seen = dict(known or {})

    def measure(b):
        if b not in seen:
            seen[b] = need(b)
        return seen[b]

    ok = lambda b: seen[b] is not None and seen[b] <= budget
    measure(start)
    if not ok(start):
        return 0, seen
    lo, hi = start, None  # need(lo) fits; need(hi) does not (None: not found yet)
    for b in sorted(seen):
        if b > lo and ok(b) and (hi is None or b < hi):
            lo = b
        elif b > start and not ok(b) and (hi is None or b < hi):
            hi = b
    while hi is None or hi - lo > 1:
        probe = _predict(seen, budget, lo, hi)
        if hi is None:
            probe = min(max(probe, lo + 1), limit)
            if probe == lo:  # at the limit
                return lo, seen
        else:
            mid = (lo + hi) // 2
            probe = min(max(probe, lo + 1), hi - 1)
            # keep the search logarithmic: a prediction in the bracket's outer eighth is a bisection
            if not (lo + (hi - lo) / 8 <= probe <= hi - (hi - lo) / 8):
                probe = mid
        measure(probe)
        if ok(probe):
            lo = probe
            if lo >= limit:
                return lo, seen
        else:
            hi = probe
    return lo, seen


def _predict(seen: dict, budget: int, lo: int, hi: Optional[int]) -> int:
    """Affine prediction of the largest fitting batch from the measured points nearest the bracket."""
    pts = sorted((b, n) for b, n in seen.items() if n is not None)
    if len(pts) < 2:
        return 2 * lo
    near = sorted(pts, key=lambda p: abs(p[0] - lo) + (abs(p[0] - hi) if hi else 0))[:2]
    (b1, n1), (b2, n2) = sorted(near)
    if b1 == b2 or n2 <= n1:
        return 2 * lo
    slope = (n2 - n1) / (b2 - b1)
    return int((budget - n1) / slope + b1)


# -- the programs -------------------------------------------------------------------------------------

PROGRAMS = ("encode", "invert", "invert-official", "null-text", "invert-direct", "edit:ddim", "edit:csg-no-mixup",
            "edit:csg", "edit:p2p", "edit:pix2pix-zero", "edit-direct:csg", "edit-direct:p2p",
            "edit-direct:pix2pix-zero", "decode", "dataset:csg")
# the inversion kind a program (its name before ":") is compiled with (the rest: "standard");
# edit-direct:<method> is the edit after Direct Inversion, which also takes its (N, B, h, w, C) latents
_INVERSION = {"invert-official": "official", "null-text": "null-text", "invert-direct": "direct",
              "edit-direct": "direct"}


def abstract_pipeline(configs: dict, dtype: Any, param_dtype: Any):
    """A :class:`~csg_jax.pipeline.Pipeline` whose params are ShapeDtypeStructs (nothing allocated).

    ``configs``: {"unet", "vae" (or None: pixel model), "text_encoder", "scheduler"} dicts as in
    a diffusers folder's config files."""
    from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from csg_jax.models.unet import UNet2DConditionModel, UNetConfig
    from csg_jax.models.vae import AutoencoderKL, VAEConfig
    from csg_jax.pipeline import Pipeline, param_shapes
    from csg_jax.schedule import SchedulerConfig

    kw = dict(dtype=dtype, param_dtype=param_dtype)
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), **kw)
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]), **kw)
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]), **kw) if configs.get("vae") else None
    params = {k: f() for k, f in param_shapes(unet, text, vae).items()}
    scaling = float(configs["vae"].get("scaling_factor", 0.18215)) if configs.get("vae") else 1.0
    return Pipeline(unet, text, vae, None, SchedulerConfig.from_dict(configs["scheduler"]), params, scaling,
                    source="abstract")


def model_configs(name: str) -> dict:
    """Architecture configs: "sd15" (Stable Diffusion 1.5), "tiny" (the test model), or a diffusers folder."""
    from csg_jax import weights
    from csg_jax.testing import sd15_configs, tiny_configs

    if name == "sd15":
        return sd15_configs()
    if name == "tiny":
        return tiny_configs("sd1")
    folder = weights.resolve_model_path(name)
    read = lambda comp, f="config.json": weights.read_json(os.path.join(folder, comp, f))
    has_vae = os.path.isdir(os.path.join(folder, "vae"))
    return {"unet": read("unet"), "text_encoder": read("text_encoder"), "vae": read("vae") if has_vae else None,
            "scheduler": read("scheduler", "scheduler_config.json")}


@dataclasses.dataclass
class Setting:
    """What every program is compiled at: image side, steps, activation / param dtypes."""

    size: int = 512
    steps: int = 50
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"


def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _abstract_prompts(pipe, batch: int, span: int = 8):
    """:class:`~csg_jax.editing.core.Prompts` of ``batch`` images as ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from csg_jax.editing.core import Prompts

    n, d = pipe.max_length, pipe.unet.config.cross_attention_dim
    spec = jax.ShapeDtypeStruct
    states = lambda: spec((batch, n, d), jnp.dtype(pipe.text_encoder.dtype))  # as pipe.embed returns
    return Prompts(states(), states(), states(), spec((batch, span), jnp.int32), spec((batch, span), jnp.float32),
                       spec((batch, n), jnp.int32), spec((batch, n), jnp.float32), spec((batch, n), jnp.float32))


def build_program(program: str, pipe, setting: Setting, batch: int, devices: Sequence) -> tuple[Any, tuple]:
    """(jitted function, abstract arguments) of ``program`` at ``batch`` images per chip.

    Single-chip programs run on ``devices[0]``; ``dataset:<method>`` is the dataset mode's
    ``jit(shard_map(...))`` over a ("data",) mesh of all ``devices``, at ``batch`` x len(devices)
    images with its real shardings."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

    from csg_jax import dataset
    from csg_jax.editing.config import EditConfig, Knobs
    from csg_jax.editing.editor import Editor, method_knobs

    kind, _, method = program.partition(":")
    config = EditConfig(method=method or "csg", num_steps=setting.steps, dtype=setting.dtype,
                        inversion=_INVERSION.get(kind, "standard"))
    side = setting.size // pipe.downsample
    editor = Editor(pipe, config, (side, side))
    c = pipe.unet.config.in_channels
    # shapes only: nothing of the batch is allocated, however large the probe
    latents = lambda b: jax.ShapeDtypeStruct((b, side, side, c), np.float32)
    images = lambda b: jax.ShapeDtypeStruct((b, setting.size, setting.size, 3), np.float32)
    knobs = Knobs.from_config(config)
    extra = method_knobs(config)

    if kind == "dataset":
        mesh = dataset.make_mesh(list(devices))
        g = batch * mesh.size
        data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        fn = dataset.batch_fn(editor, mesh, sample=False)
        args = (_abstract(pipe.params, rep), _abstract(images(g), data), None,
                _abstract(_abstract_prompts(pipe, g, dataset.SPAN_WIDTH), data),
                _abstract(Knobs.stack([config] * g), data), _abstract(extra, rep), None)
        return fn, args

    one = SingleDeviceSharding(devices[0])
    a = lambda tree: _abstract(tree, one)
    params = a(pipe.params)
    prompts = a(_abstract_prompts(pipe, batch))
    if program == "encode":
        return editor.jitted("encode"), (params, a(images(batch)))
    if program in ("invert", "invert-official", "invert-direct"):
        stage = "invert_direct" if program == "invert-direct" else "invert"
        return editor.jitted(stage), (params, a(latents(batch)), prompts.source)
    if program == "null-text":
        return editor.jitted("null_text"), (params, a(latents(batch)), prompts, a(knobs))
    if program == "decode":  # the CLI decodes reconstruction and edit together
        return editor.jitted("decode"), (params, a(latents(2 * batch)))
    if kind == "edit":
        args = (params, a(latents(batch)), prompts, a(knobs))
        return editor.jitted("edit"), args + ((a(extra),) if extra is not None else ())
    if kind == "edit-direct":  # (..., extra_knobs, uncond, path) as Editor.program calls it
        path = jax.ShapeDtypeStruct((setting.steps, batch, side, side, c), np.float32)
        return editor.jitted("edit"), (params, a(latents(batch)), prompts, a(knobs),
                                       None if extra is None else a(extra), None, a(path))
    raise ValueError(f"unknown program {program!r}; choose from {', '.join(PROGRAMS)}")


def program_result(program: str, pipe, setting: Setting, batch: int, target: Target, devices: Sequence,
                   dump: bool = True, run: bool = False) -> CompileResult:
    """Build and compile ``program`` for ``target`` at ``batch`` per chip."""
    try:
        fn, args = build_program(program, pipe, setting, batch, devices)
    except Exception as e:
        return CompileResult(program, target.name, batch, False, error=f"{type(e).__name__}: {e}")
    # the flags csg_jax.runtime sets for real GPU runs (memory of an SPMD program is per chip)
    gpu = target.platform == "cuda" or (target.platform == "device" and devices[0].platform == "gpu")
    options = runtime.GPU_COMPILER_OPTIONS if gpu else None
    return compile_program(program, fn, args, target.name, batch, dump=dump, options=options, run=run)
