"""Dataset translation (csg_jax/dataset.py): manifests, buckets, sharding over devices and hosts, resume.

The multi-device runs happen in subprocesses (``python -m csg_jax.translate --manifest``), since
simulated CPU devices (``--xla_force_host_platform_device_count``) must be set before JAX starts.
They share one persistent compilation cache, so a program compiled by one run is loaded by the
next. Tiny model, 32x32 images, 4 DDIM steps (as tests/test_csg.py, whose compiled edit the
in-process single-image reference reuses when both run in one session).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from csg_jax.dataset import (
    Item, ResultsLog, check_ids, plan_batches, read_manifest, read_results, scan_folder,
)
from csg_jax.editing.config import EditConfig
from csg_jax.errors import ConfigError
from csg_jax.shapes.world import make_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMEOUT = 900  # seconds per subprocess run: generous, the test machine is shared


# --- helpers ---------------------------------------------------------------------------------------

def _env(cache_dir: str, devices: int, **extra) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env.update({
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
        **extra,
    })
    return env


def _cmd(manifest: str, out: str, model: str, *extra: str) -> list:
    return [sys.executable, "-m", "csg_jax.translate", "--manifest", manifest, "--model", model, "--size", "32",
            "--steps", str(STEPS), "--out", out, "--quiet", "--save-latents", *extra]


def _write_images(folder: str, n: int, seed: int, size: int = 32) -> list:
    """n shapes-world PNGs (red objects, so "red" is in every caption) -> [(path, caption)]."""
    os.makedirs(folder, exist_ok=True)
    batch = make_batch(seed, n, size=size, color="red")
    out = []
    for i, (im, cap) in enumerate(zip(batch["images"], batch["captions"])):
        path = os.path.join(folder, f"s{seed}_{i}.png")
        Image.fromarray(im).save(path)
        out.append((path, cap))
    return out


def _write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _results_by_id(out: str) -> dict:
    by_id = {}
    for r in read_results(out):
        by_id.setdefault(r["id"], []).append(r)
    return by_id


def _all_pngs_decode(out: str) -> int:
    n = 0
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".png"):
                with Image.open(os.path.join(root, f)) as im:
                    im.load()
                n += 1
    return n


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


# --- manifests, ids, buckets (no JAX programs) --------------------------------------------------------

def test_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "sub").mkdir()
    jl = _write_jsonl(str(tmp_path / "m.jsonl"), [
        {"image": "sub/a.png", "prompt": "a red circle", "task": "red2blue"},
        "",
        "# a comment",
        {"id": "x", "image": "/abs/b.png", "prompt": "a cat", "target_prompt": "a dog", "steps": 10, "guidance-scale": 7},
        "{not json",
        {"image": "c.png", "prompt": "a cat"},
        {"id": "x", "image": "d.png", "prompt": "a cat", "task": "cat2dog"},
        {"id": "../evil", "image": "d.png", "prompt": "a cat", "task": "cat2dog"},
    ])
    items = read_manifest(jl)
    assert [it.id for it in items] == ["1", "x", "5", "6", "x", "../evil"]
    assert items[0].image == str(tmp_path / "sub" / "a.png") and items[0].error is None
    assert items[1].image == "/abs/b.png" and dict(items[1].overrides) == {"num_steps": 10, "guidance_scale": 7}
    assert "malformed JSON" in items[2].error and items[2].line == 5
    assert "task" in items[3].error
    assert "duplicate id 'x'" in items[4].error
    assert "cannot name a folder" in items[5].error

    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,prompt,task,guidance_scale\n\nsub/a.png,a red circle,red2blue,\n"
                        "b.png,\"a cat, sitting\",cat2dog,7.5\n"
                        "c.png,a cat,cat2dog,1,extra\n")
    items = read_manifest(str(csv_path))
    assert [it.id for it in items] == ["3", "4", "5"]  # line numbers (header = line 1, blank line 2)
    assert items[0].overrides == () and items[1].prompt == "a cat, sitting"
    assert dict(items[1].overrides) == {"guidance_scale": "7.5"}
    assert "header columns" in items[2].error


def test_item_overrides_and_buckets(tmp_path):
    from csg_jax.dataset import item_config

    base = EditConfig(num_steps=4)
    mk = lambda i, **o: Item(i, i + 1, f"i{i}", "x.png", "a cat", "cat2dog", overrides=tuple(sorted(o.items())))
    assert item_config(base, mk(0, guidance_scale="7.5", seed="3")) == base.replace(guidance_scale=7.5, seed=3)
    for bad in ({"dtype": "bfloat16"}, {"colour": "red"}, {"num_steps": "many"}, {"method": "magic"}):
        with pytest.raises(ConfigError):
            item_config(base, mk(0, **bad))
    entries = [(mk(i), item_config(base, mk(i, **o)), hw) for i, (o, hw) in enumerate([
        ({}, (32, 32)), ({"guidance_scale": 9}, (32, 32)), ({}, (32, 48)), ({"num_steps": 5}, (32, 32)),
        ({"seed": 4}, (32, 32)), ({"encode": "sample"}, (32, 32)), ({}, (32, 32))])]
    batches = plan_batches(entries, global_batch=2)
    # float knobs and seeds share a bucket; size, steps and VAE sampling make new ones
    assert [[it.id for it, _ in b.items] for b in batches] == [["i0", "i1"], ["i4", "i6"], ["i2"], ["i3"], ["i5"]]
    assert [it.id for it, _ in batches[2].slots(4)] == ["i2"] * 4  # padding repeats the last item


def test_input_dir_and_ids(tmp_path):
    for name in ("b.png", "a.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    items = scan_folder(str(tmp_path), "a cat", task="cat2dog")
    assert [(it.id, os.path.basename(it.image), it.error is None) for it in items] == [
        ("a", "a.jpg", True), ("a", "a.png", False), ("b", "b.png", True)]
    assert all(it.error for it in check_ids([Item(0, 1, ".hidden"), Item(1, 2, "results.jsonl"), Item(2, 3, "summary.json")]))


def test_results_log_recovers_from_a_torn_line(tmp_path):
    path = str(tmp_path / "results.jsonl")
    with open(path, "w") as f:
        f.write('{"id": "a", "status": "ok"}\n{"id": "b", "sta')  # killed mid-write (power loss)
    log = ResultsLog(path)
    log.append({"id": "c", "status": "ok"})
    log.close()
    assert [r["id"] for r in read_results(str(tmp_path))] == ["a", "c"]


def test_per_item_seeds_draw_each_images_own_posterior_sample(tiny_sd1):
    """encode="sample": a batch with per-item keys = each image encoded alone with its seed."""
    import jax
    import jax.numpy as jnp

    from csg_jax.editing.editor import encode_items

    images = jnp.asarray(make_batch(5, 3, size=32)["images"], jnp.float32) / 127.5 - 1.0
    seeds = [7, 7, 11]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    batched = np.asarray(jax.jit(lambda p, x, k: encode_items(tiny_sd1.encode, p, x, k))(tiny_sd1.params, images, keys))
    single = jax.jit(tiny_sd1.encode)
    for i, s in enumerate(seeds):
        want = np.asarray(single(tiny_sd1.params, images[i : i + 1], jax.random.PRNGKey(s)))[0]
        np.testing.assert_allclose(batched[i], want, atol=1e-6, rtol=0)
    mean = np.asarray(jax.jit(tiny_sd1.encode)(tiny_sd1.params, images[:1]))[0]
    assert np.abs(batched[0] - mean).max() > 1e-3  # (it is a sample, not the mean)


# --- 8 simulated devices: equal to single-image results; two buckets; bad items --------------------------

@pytest.fixture(scope="module")
def run8(tmp_path_factory, tiny_sd1_dir, tiny_sd1, cache_dir, two_process_job):
    """One 8-device run over a manifest with good items (per-item knobs, a 32x48 image) and bad ones;
    the single-image references are computed in this process while it runs. (Asks for
    ``two_process_job`` only to start it first: the runs overlap, compilation is mostly one thread.)"""
    root = tmp_path_factory.mktemp("run8")
    (a, cap_a), (b, cap_b), (c, cap_c) = _write_images(str(root / "img"), 3, seed=1)
    wide = make_batch(2, 1, size=48, color="red")
    Image.fromarray(wide["images"][0][8:40]).save(root / "img" / "wide.png")  # 32x48
    (root / "img" / "garbage.png").write_bytes(b"this is not a PNG")
    rows = [
        {"id": "a", "image": "img/" + os.path.basename(a), "prompt": cap_a, "task": "red2blue"},
        {"id": "b", "image": "img/" + os.path.basename(b), "prompt": cap_b, "task": "red2green",
         "guidance_scale": 7.5, "posterior_guidance": 3.0},
        {"image": "img/" + os.path.basename(c), "prompt": cap_c, "target_prompt": cap_c.replace("red", "yellow"),
         "delta": 1.2, "seed": 5},  # id "3" (line number)
        # (non-square latents need mask_res >= the coarsest cross-attention layer's sqrt(H W): 16x24 -> 6)
        {"id": "wide", "image": "img/wide.png", "prompt": wide["captions"][0], "task": "red2blue", "mask_res": 6},
        {"id": "garbage", "image": "img/garbage.png", "prompt": cap_a, "task": "red2blue"},
        {"id": "missing", "image": "img/nope.png", "prompt": cap_a, "task": "red2blue"},
        {"id": "noword", "image": "img/" + os.path.basename(a), "prompt": cap_a, "target_prompt": "a blue zebra",
         "source_word": "zebra"},
        "{this is not json",  # id "8"
        {"id": "a", "image": "img/" + os.path.basename(b), "prompt": cap_b, "task": "red2blue"},
        {"id": "knob", "image": "img/" + os.path.basename(a), "prompt": cap_a, "task": "red2blue", "guidance_scale": "lots"},
    ]
    manifest = _write_jsonl(str(root / "manifest.jsonl"), rows)
    out = str(root / "out")
    logs = [open(root / f"run.{k}", "w+") for k in ("out", "err")]
    proc = subprocess.Popen(_cmd(manifest, out, tiny_sd1_dir), env=_env(cache_dir, 8), stdout=logs[0], stderr=logs[1],
                            cwd=REPO)
    try:
        references = {(r.get("id", "3")): _reference(tiny_sd1, root, r) for r in rows[:3]}
        stdout, stderr = _finish(proc, logs)
    finally:
        if proc.poll() is None:
            proc.kill()
        for f in logs:
            f.close()
    return {"proc": subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "out": out, "rows": rows,
            "root": root, "references": references}


def _reference(pipe, root, row):
    """The single-image API's result for a manifest row (one device, batch of one)."""
    from csg_jax import io
    from csg_jax.editing.editor import translate_image

    image, _ = io.load_image(os.path.join(root, row["image"]), 32, 8)
    knobs = {k: row[k] for k in ("guidance_scale", "posterior_guidance", "delta", "seed") if k in row}
    return translate_image(pipe, image, row["prompt"], task=row.get("task"), target_prompt=row.get("target_prompt"),
                           config=EditConfig(num_steps=STEPS, **knobs))


def ref_guidance(rows, item_id):
    return next(r for r in rows[:3] if r.get("id", "3") == item_id).get("guidance_scale", 5.0)


def test_bad_items_are_recorded_and_the_rest_finish(run8):
    proc, out = run8["proc"], run8["out"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    by_id = _results_by_id(out)
    ok = {i for i, rs in by_id.items() if any(r["status"] == "ok" for r in rs)}
    assert ok == {"a", "b", "3", "wide"}
    errors = {(r["id"], r["line"]): r["error"] for rs in by_id.values() for r in rs if r["status"] == "error"}
    assert set(errors) == {("garbage", 5), ("missing", 6), ("noword", 7), ("8", 8), ("a", 9), ("knob", 10)}
    assert "cannot read image" in errors["garbage", 5] and "not found" in errors["missing", 6]
    assert "zebra" in errors["noword", 7] and "malformed JSON" in errors["8", 8]
    assert "duplicate id" in errors["a", 9] and "lots" in errors["knob", 10]
    for i in ok:
        assert len([r for r in by_id[i] if r["status"] == "ok"]) == 1
        assert os.path.isfile(os.path.join(out, i, "meta.json"))
    for i in ("garbage", "missing", "noword", "8", "knob"):
        assert not os.path.exists(os.path.join(out, i))
    assert _all_pngs_decode(out) == 5 * 4
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert (summary["ok"], summary["failed"], summary["devices"], summary["buckets"]) == (4, 6, 8, 2)
    assert "ok" in proc.stdout and "failed" in proc.stdout and "images/s" in proc.stdout


def test_mixed_resolutions_make_two_buckets(run8):
    by_id = _results_by_id(run8["out"])
    buckets = {i: [r for r in by_id[i] if r["status"] == "ok"][0]["bucket"] for i in ("a", "b", "3", "wide")}
    assert buckets["a"] == buckets["b"] == buckets["3"] != buckets["wide"]
    assert buckets["a"].startswith("32x32") and buckets["wide"].startswith("32x48")
    with Image.open(os.path.join(run8["out"], "wide", "edit.png")) as im:
        assert im.size == (48, 32)


def test_eight_devices_equal_single_image_results(run8):
    """Items of one sharded batch (with different knobs and a seed) = the single-image API, item by item."""
    from csg_jax import io

    assert run8["proc"].returncode == 3, run8["proc"].stderr[-3000:]
    for item_id, ref in run8["references"].items():
        got = np.load(os.path.join(run8["out"], item_id, "latents.npz"))
        for name, want in [("inverted", ref.inverted), ("reconstruction", ref.reconstruction_latent),
                           ("edited", ref.edited_latent), ("mask_raw", ref.mask_raw), ("mask", ref.mask)]:
            np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=0, err_msg=f"{item_id} {name}")
        edit = np.asarray(Image.open(os.path.join(run8["out"], item_id, "edit.png")), np.int32)
        assert np.abs(edit - io.to_uint8(ref.edit).astype(np.int32)).max() <= 1
        meta = json.load(open(os.path.join(run8["out"], item_id, "meta.json")))
        assert meta["settings"]["guidance_scale"] == ref_guidance(run8["rows"], item_id)
        assert meta["dataset"]["devices"] == 8 and meta["prompts"]["target_prompt"] == ref.plan.target_prompt


# --- kill and resume ------------------------------------------------------------------------------------

def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_sd1_dir, cache_dir, run8):
    """SIGKILL right after the first result line, rerun: every item exactly once, all files whole."""
    images = _write_images(str(tmp_path / "img"), 12, seed=3)  # 2 global batches (8 + 4) on 8 devices
    manifest = _write_jsonl(str(tmp_path / "m.jsonl"), [
        {"id": f"k{i:02d}", "image": os.path.relpath(p, tmp_path), "prompt": cap, "task": "red2blue"}
        for i, (p, cap) in enumerate(images)])
    out = str(tmp_path / "out")
    results = os.path.join(out, "results.jsonl")
    env = _env(cache_dir, 8)
    proc = subprocess.Popen(_cmd(manifest, out, tiny_sd1_dir), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(results) and os.path.getsize(results) > 0:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    first = [r["id"] for r in read_results(out)]
    assert 1 <= len(first) < 12

    rerun = subprocess.run(_cmd(manifest, out, tiny_sd1_dir), env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = read_results(out)
    assert sorted(r["id"] for r in records) == [f"k{i:02d}" for i in range(12)]  # each exactly once
    assert all(r["status"] == "ok" for r in records)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped"] == len(set(first)) and summary["ok"] == 12 - summary["skipped"]
    assert not [n for n in os.listdir(out) if ".partial-" in n or ".old-" in n]
    assert _all_pngs_decode(out) == 12 * 5
    for i in range(12):
        json.load(open(os.path.join(out, f"k{i:02d}", "meta.json")))


# --- two processes (jax.distributed on localhost, gloo CPU collectives) ----------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_job(tmp_path_factory, tiny_sd1_dir, cache_dir):
    """Two processes x 2 simulated devices, one jax.distributed job on localhost (started, not awaited)."""
    root = tmp_path_factory.mktemp("two_processes")
    images = _write_images(str(root / "img"), 6, seed=4)
    rows = [{"id": f"p{i}", "image": os.path.relpath(p, root), "prompt": cap, "task": "red2green"}
            for i, (p, cap) in enumerate(images)]
    rows.insert(3, "not json")  # line 4: recorded by the host owning item index 3
    manifest = _write_jsonl(str(root / "m.jsonl"), rows)
    out = str(root / "out")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(cache_dir, 2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        # ddim: the cheapest program (this topology compiles its own); 4 devices, global batch 4, so the
        # second batch (items 4-5 + 2 padding rows) leaves process 1 only padding
        logs = [open(root / f"p{pid}.{k}", "w+") for k in ("out", "err")]  # (files: pipes could fill up)
        procs.append((subprocess.Popen(_cmd(manifest, out, tiny_sd1_dir, "--method", "ddim", "--distributed"), env=env,
                                       cwd=REPO, stdout=logs[0], stderr=logs[1]), logs))
    yield {"procs": procs, "out": out}
    for p, logs in procs:
        if p.poll() is None:
            p.kill()
        for f in logs:
            f.close()


def _finish(proc, logs):
    proc.wait(timeout=TIMEOUT)
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
    return tuple(texts)


def test_two_processes_cover_every_item_exactly_once(two_process_job):
    out = two_process_job["out"]
    procs = [p for p, _ in two_process_job["procs"]]
    outs = [_finish(p, logs) for p, logs in two_process_job["procs"]]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 3, err[-3000:]
    assert sorted(os.path.basename(f) for f in os.listdir(out) if f.startswith("results")) == \
        ["results.p0.jsonl", "results.p1.jsonl"]
    records = read_results(out)
    assert sorted(r["id"] for r in records) == sorted([f"p{i}" for i in range(6)] + ["4"])
    assert {r["id"] for r in records if r["status"] == "error"} == {"4"}
    assert {r["process"] for r in records if r["status"] == "ok"} == {0, 1}
    for i in range(6):
        assert os.path.isfile(os.path.join(out, f"p{i}", "meta.json"))
    assert "dataset run" in outs[0][0] and "dataset run" not in outs[1][0]  # the summary: process 0 only


# --- every method through dataset mode ---------------------------------------------------------------

def test_every_method_and_null_text_inversion_run_in_dataset_mode(tmp_path, tiny_sd1):
    """Per-item method overrides (P2P, Pix2Pix-Zero, null-text inversion) each get their own bucket
    and finish with the single-image files; 3 steps keep the three compilations short."""
    from csg_jax.dataset import DatasetRun

    (a, cap), = _write_images(str(tmp_path / "img"), 1, seed=4)
    rows = [
        {"id": "p2p", "image": a, "prompt": cap, "task": "red2blue", "method": "p2p"},
        {"id": "zero", "image": a, "prompt": cap, "task": "red2blue", "method": "pix2pix-zero"},
        {"id": "null", "image": a, "prompt": cap, "task": "red2blue", "method": "ddim", "inversion": "null-text",
         "null_text_steps": 2},
    ]
    items = read_manifest(_write_jsonl(str(tmp_path / "m.jsonl"), rows))
    out = str(tmp_path / "out")
    summary = DatasetRun(tiny_sd1, items, EditConfig(num_steps=3), out, batch_size=1, size=32, quiet=True,
                         save_inversion=True).run()
    assert (summary["ok"], summary["failed"], summary["buckets"]) == (3, 0, 3), summary
    for item_id, method in [("p2p", "p2p"), ("zero", "pix2pix-zero"), ("null", "ddim")]:
        meta = json.load(open(os.path.join(out, item_id, "meta.json")))
        assert meta["settings"]["method"] == method
        for name in ("edit.png", "reconstruction.png", "mask.png", "grid.png"):
            assert os.path.isfile(os.path.join(out, item_id, name)), (item_id, name)
    assert os.path.isfile(os.path.join(out, "null", "null_embeddings.npy"))
    assert _all_pngs_decode(out) >= 3 * 4
