"""Evaluation metrics (csg_jax.metrics, csg_jax.evaluate) on tiny random-weight networks.

Oracles: transformers' CLIPModel / ViTModel (tiny configs) for the ViT towers; for VGG-16 and
AlexNet (no torchvision here) a torch ``nn.Sequential`` with torchvision's exact ``features``
layer indices; for LPIPS an independent torch implementation of the lpips v0.1 formula (the
``lpips`` package imports torchvision, so it cannot be imported here). Parity: max abs err <= 1e-4.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
import transformers
from PIL import Image

from csg_jax.metrics import preprocess as pp
from csg_jax.metrics import scores as S
from csg_jax.metrics import vgg as V
from csg_jax.metrics.vit import CLIPModel, load_clip, load_dino
from csg_jax.tokenizer_files import write_clip_tokenizer

torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "cat", "dog", "red", "circle", "square", "on", "blue", "background"]
VGG_W = (4, 8, 8, 16, 16)
ALEX_W = (4, 8, 8, 8, 8)
TOL = 1e-4


# --- torch oracles -------------------------------------------------------------------------------

def torch_vgg16_features(widths):
    """torchvision.models.vgg16().features with other widths: same layer indices."""
    layers, cin = [], 3
    for n, c in zip((2, 2, 3, 3, 3), widths):
        for _ in range(n):
            layers += [tnn.Conv2d(cin, c, 3, padding=1), tnn.ReLU()]
            cin = c
        layers.append(tnn.MaxPool2d(2, 2))
    return tnn.Sequential(*layers)


def torch_alexnet_features(w):
    """torchvision.models.alexnet().features with other widths."""
    return tnn.Sequential(
        tnn.Conv2d(3, w[0], 11, stride=4, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(w[0], w[1], 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(w[1], w[2], 3, padding=1), tnn.ReLU(),
        tnn.Conv2d(w[2], w[3], 3, padding=1), tnn.ReLU(),
        tnn.Conv2d(w[3], w[4], 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(3, 2))


VGG_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3", 29: "relu5_3"}
ALEX_TAPS = {1: "relu1", 4: "relu2", 7: "relu3", 9: "relu4", 11: "relu5"}


def torch_taps(seq, taps, x):
    out, h = {}, x
    for i, m in enumerate(seq):
        h = m(h)
        if i in taps:
            out[taps[i]] = h
        if len(out) == len(taps):
            break
    return out


def torch_lpips(seq, taps, lins, a, b):
    """lpips v0.1 (Zhang et al.) written out: a, b NCHW in [-1, 1] -> (value (B,), map (B, H, W))."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fa, fb = torch_taps(seq, taps, (a - shift) / scale), torch_taps(seq, taps, (b - shift) / scale)
    value, full = 0.0, 0.0
    for k, name in enumerate(taps.values()):
        na = fa[name] / (torch.sqrt(torch.sum(fa[name] ** 2, dim=1, keepdim=True)) + 1e-10)
        nb = fb[name] / (torch.sqrt(torch.sum(fb[name] ** 2, dim=1, keepdim=True)) + 1e-10)
        r = lins[k]((na - nb) ** 2)
        value = value + r.mean(dim=(2, 3))[:, 0]
        full = full + F.interpolate(r, size=a.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    return value, full


def splice_self_sim(keys):
    """Splice's attn_cosine_sim on (B, T, C) keys."""
    n = keys.norm(dim=2, keepdim=True)
    return (keys @ keys.transpose(1, 2)) / torch.clamp(n @ n.transpose(1, 2), min=1e-8)


# --- tiny weights ------------------------------------------------------------------------------

def _perturb(module, amount=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount * torch.randn_like(p))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("metric_weights"))


def make_tiny_weights(root):
    """Random tiny CLIP / DINO / VGG / AlexNet / LPIPS weights in their published file layouts under
    ``root`` (a pathlib.Path), plus the torch modules (oracles)."""
    torch.manual_seed(0)
    clip_dir = root / "clip"
    vocab = write_clip_tokenizer(str(clip_dir), WORDS)
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    tc = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    vc = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    _perturb(clip)
    clip.save_pretrained(str(clip_dir))

    dino_dir = root / "dino"
    dino = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, layer_norm_eps=1e-6)).eval()
    _perturb(dino)
    dino.save_pretrained(str(dino_dir))

    vgg = torch_vgg16_features(VGG_W).eval()
    _perturb(vgg)
    vgg_sd = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    vgg_sd.update({"classifier.0.weight": torch.randn(8, 4), "classifier.0.bias": torch.randn(8)})  # ignored
    torch.save(vgg_sd, root / "vgg16.pth")
    alex = torch_alexnet_features(ALEX_W).eval()
    _perturb(alex)
    torch.save({f"features.{k}": v for k, v in alex.state_dict().items()}, root / "alexnet.pth")

    def heads(widths_per_tap, name):
        lins = [tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False)).eval() for c in widths_per_tap]
        with torch.no_grad():
            for l in lins:
                l[1].weight.copy_(torch.rand_like(l[1].weight))  # lpips heads are non-negative
        torch.save({f"lin{k}.model.1.weight": l[1].weight.detach().clone() for k, l in enumerate(lins)}, root / name)
        return [l[1] for l in lins]

    vgg_lins = heads([VGG_W[0], VGG_W[1], VGG_W[2], VGG_W[3], VGG_W[4]], "lpips_vgg.pth")
    alex_lins = heads(list(ALEX_W), "lpips_alex.pth")
    return dict(root=root, clip_dir=str(clip_dir), clip=clip, tok=tok, dino_dir=str(dino_dir), dino=dino,
                vgg_file=str(root / "vgg16.pth"), vgg=vgg, alex_file=str(root / "alexnet.pth"), alex=alex,
                lpips_vgg=str(root / "lpips_vgg.pth"), lpips_alex=str(root / "lpips_alex.pth"),
                vgg_lins=vgg_lins, alex_lins=alex_lins)


def _images(n, h, w, seed=0):
    """Smooth random uint8 pictures (sums of a few sinusoids) -- photo-like, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((n, h, w, 3))
    for _ in range(4):
        f = rng.uniform(1, 6, (n, 1, 1, 3))
        ph = rng.uniform(0, 6.3, (n, 1, 1, 3))
        out += np.sin(f * (xx[..., None] * rng.uniform(-1, 1) + yy[..., None] * rng.uniform(-1, 1)) * 6.3 + ph)
    return np.clip(127.5 + 40 * out, 0, 255).astype(np.uint8)


# --- RD ----------------------------------------------------------------------------------------

def test_relational_distance_closed_form_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        a = rng.uniform(0, 2, (n, n))
        g_src = a + a.T
        np.fill_diagonal(g_src, 0)
        g_tgt = 0.7 * g_src + rng.normal(0, 0.2, (n, n))
        rd, gamma = V.relational_distance(g_src, g_tgt)
        grid = np.linspace(-2, 3, 200001)
        losses = [np.sum((g_tgt - g * g_src) ** 2) / n for g in grid[::100]]
        g0 = grid[::100][int(np.argmin(losses))]
        fine = np.linspace(g0 - 0.003, g0 + 0.003, 6001)
        fine_losses = np.array([np.sum((g_tgt - g * g_src) ** 2) / n for g in fine])
        assert abs(fine[np.argmin(fine_losses)] - gamma) < 2e-6
        assert rd <= fine_losses.min() + 1e-12 and rd == pytest.approx(fine_losses.min(), rel=1e-9, abs=1e-12)
    assert V.relational_distance(np.zeros((1, 1)), np.zeros((1, 1))) == (0.0, 0.0)
    g = rng.uniform(size=(4, 4))
    assert V.relational_distance(g, 3.0 * g)[0] == pytest.approx(0.0, abs=1e-12)  # scale-invariant


# --- preprocessing -----------------------------------------------------------------------------

@pytest.mark.parametrize("filt", ["bicubic", "bilinear"])
def test_antialias_resize_matches_pil_float_and_torch_antialias(filt):
    x = np.random.default_rng(1).uniform(0, 255, (37, 52)).astype(np.float32)
    for out_hw in [(16, 22), (50, 60), (37, 20)]:
        mh, mw = pp.resize_matrix(37, out_hw[0], filt), pp.resize_matrix(52, out_hw[1], filt)
        ours = mh @ x @ mw.T
        pil = np.asarray(Image.fromarray(x, "F").resize(out_hw[::-1], getattr(Image, filt.upper())))
        tt = F.interpolate(torch.from_numpy(x)[None, None], size=out_hw, mode=filt, antialias=True,
                           align_corners=False)[0, 0].numpy()
        assert np.abs(ours - pil).max() < 1e-3  # in 0..255 units
        assert np.abs(ours - tt).max() < 1e-3
    tt = F.interpolate(torch.from_numpy(x)[None, None], size=(16, 22), mode=filt, align_corners=False)[0, 0].numpy()
    ours = pp.resize_matrix(37, 16, filt, "torch") @ x @ pp.resize_matrix(52, 22, filt, "torch").T
    assert np.abs(ours - tt).max() < 1e-3


def test_clip_preprocess_vs_clip_image_processor():
    """Our float (antialias) resize vs transformers' 8-bit PIL processor: ~1 grey level on smooth images."""
    imgs = _images(2, 40, 48, seed=3)
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = proc(list(imgs), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(pp.clip_preprocess(jnp.asarray(imgs, jnp.float32), 32))
    exact = S._pil_clip_preprocess(imgs, 32)
    assert np.abs(exact - want).max() < 1e-5
    diff = np.abs(ours - want).max()
    print(f"CLIP preprocessing, antialias (JAX float) vs CLIPImageProcessor (PIL uint8): max {diff:.4f} "
          f"normalised units = {diff * 0.27 * 255:.2f} grey levels")
    assert diff < 3 / 255 / 0.26  # <= ~3 grey levels


# --- parity ------------------------------------------------------------------------------------

def test_clip_parity_and_cs(tiny):
    t0 = time.perf_counter()
    lc = load_clip(tiny["clip_dir"])
    tclip, tok = tiny["clip"], tiny["tok"]
    prompts = ["a photo of a cat", "a red circle on a blue background"]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="np")
    imgs = _images(2, 40, 48, seed=4)
    pv = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        list(imgs), return_tensors="np")["pixel_values"]
    with torch.no_grad():
        ti = tclip.get_image_features(pixel_values=torch.from_numpy(pv))
        tt = tclip.get_text_features(input_ids=torch.from_numpy(ids["input_ids"]),
                                     attention_mask=torch.from_numpy(ids["attention_mask"]))
    ti = getattr(ti, "pooler_output", ti).numpy()
    tt = getattr(tt, "pooler_output", tt).numpy()
    gi = np.asarray(lc.model.apply({"params": lc.params}, jnp.asarray(pv.transpose(0, 2, 3, 1)),
                                   method=CLIPModel.image_features))
    gt = np.asarray(lc.model.apply({"params": lc.params}, jnp.asarray(ids["input_ids"], jnp.int32),
                                   method=CLIPModel.text_features))
    e_img, e_txt = np.abs(gi - ti).max(), np.abs(gt - tt).max()
    want_cos = np.sum(ti / np.linalg.norm(ti, axis=-1, keepdims=True) * tt / np.linalg.norm(tt, axis=-1, keepdims=True), -1)
    cs_pil = S.ClipSimilarity(lc, resample="pil")(imgs, prompts)["cs"]
    cs_aa = S.ClipSimilarity(lc)(imgs, prompts)
    e_cs = np.abs(cs_pil - want_cos).max()
    print(f"CLIP parity: image emb {e_img:.2e}, text emb {e_txt:.2e}, CS (pil resample) {e_cs:.2e}, "
          f"CS antialias vs processor {np.abs(cs_aa['cs'] - want_cos).max():.2e} ({time.perf_counter() - t0:.1f}s)")
    assert e_img <= TOL and e_txt <= TOL and e_cs <= TOL
    assert np.abs(cs_aa["cs"] - want_cos).max() < 5e-3
    np.testing.assert_allclose(cs_aa["clipscore"], 2.5 * np.maximum(cs_aa["cs"], 0), rtol=1e-6)


def test_dino_parity_keys_and_sd(tiny):
    t0 = time.perf_counter()
    ld = load_dino(tiny["dino_dir"])
    tv = tiny["dino"]
    keys = {}
    hook = tv.layers[-1].attention.k_proj.register_forward_hook(lambda m, i, o: keys.__setitem__("k", o))
    errs = []
    try:
        for hw in [(32, 32), (32, 48)]:  # (32, 48): position embeddings interpolated (bicubic)
            x = np.random.default_rng(5).standard_normal((2, 3) + hw).astype(np.float32)
            with torch.no_grad():
                tv(torch.from_numpy(x), interpolate_pos_encoding=True)
            got = ld.model.apply({"params": ld.params}, jnp.asarray(x.transpose(0, 2, 3, 1)))["keys"]
            errs.append(np.abs(np.asarray(got) - keys["k"].numpy()).max())
        # SD end to end: torchvision-style Resize(32, max_size=480) (bilinear antialias) + ImageNet norm
        src, edit = _images(2, 40, 56, seed=6), _images(2, 40, 56, seed=7)

        def torch_ssim(u8):
            x = torch.from_numpy(u8.astype(np.float32).transpose(0, 3, 1, 2))
            x = F.interpolate(x, size=pp.shortest_side_size((40, 56), 32, 480), mode="bilinear", antialias=True,
                              align_corners=False) / 255.0
            x = (x - torch.tensor(pp.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(pp.IMAGENET_STD).view(1, 3, 1, 1)
            with torch.no_grad():
                tv(x, interpolate_pos_encoding=True)
            return splice_self_sim(keys["k"])

        want = ((torch_ssim(src) - torch_ssim(edit)) ** 2).mean(dim=(1, 2)).numpy()
    finally:
        hook.remove()
    scorer = S.StructureDistance(ld, size=32)
    got = scorer(src, edit)
    e_sd = np.abs(got - want).max()
    print(f"DINO parity: keys {errs[0]:.2e} (square) {errs[1]:.2e} (interpolated), SD {e_sd:.2e} "
          f"(SD torch {want.tolist()}, ours {got.tolist()}) ({time.perf_counter() - t0:.1f}s)")
    assert max(errs) <= TOL and e_sd <= TOL
    assert np.all(scorer(src, src) == 0.0)


def test_vgg_parity_and_perceptual(tiny):
    t0 = time.perf_counter()
    cfg, params = V.load_trunk(tiny["vgg_file"])
    assert cfg.widths == VGG_W
    x = np.random.default_rng(8).standard_normal((2, 3, 32, 40)).astype(np.float32)
    with torch.no_grad():
        want = torch_taps(tiny["vgg"], VGG_TAPS, torch.from_numpy(x))
    got = V.ConvFeatures(cfg, tuple(VGG_TAPS.values())).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    e_feat = max(np.abs(np.asarray(got[k]) - want[k].numpy().transpose(0, 2, 3, 1)).max() for k in want)
    # perceptual distances (Johnson): sum over relu1_2..relu4_3 of mean squared feature differences
    imgs = _images(3, 32, 32, seed=9)
    norm = (torch.from_numpy(imgs.astype(np.float32).transpose(0, 3, 1, 2)) / 255.0
            - torch.tensor(pp.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(pp.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = torch_taps(tiny["vgg"], {i: n for i, n in VGG_TAPS.items() if n != "relu5_3"}, norm)
    want_g = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            want_g[i, j] = sum(float(((f[k][i] - f[k][j]) ** 2).mean()) for k in f)
    perc = S.Perceptual(cfg, params, batch_size=2)  # 2 blocks: exercises the blockwise pairwise path
    g = perc.pairwise(imgs)
    e_g = np.abs(g - want_g).max()
    e_d = np.abs(perc.distance(imgs, imgs[::-1].copy()) - want_g[[0, 1, 2], [2, 1, 0]]).max()
    print(f"VGG parity: features {e_feat:.2e}, pairwise perceptual {e_g:.2e} (scale {want_g.max():.3f}), "
          f"rowwise {e_d:.2e} ({time.perf_counter() - t0:.1f}s)")
    assert e_feat <= TOL and e_g <= TOL * max(1.0, want_g.max()) and e_d <= TOL * max(1.0, want_g.max())


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_parity_and_background(tiny, net):
    t0 = time.perf_counter()
    if net == "vgg":
        cfg, trunk = V.load_trunk(tiny["vgg_file"])
        heads = V.load_heads(tiny["lpips_vgg"], cfg)
        seq, taps, lins, hw = tiny["vgg"], VGG_TAPS, tiny["vgg_lins"], (32, 40)
    else:
        cfg, trunk = V.load_trunk(tiny["alex_file"], "alexnet")
        heads = V.load_heads(tiny["lpips_alex"], cfg)
        seq, taps, lins, hw = tiny["alex"], ALEX_TAPS, tiny["alex_lins"], (64, 72)
    a, b = _images(2, *hw, seed=10), _images(2, *hw, seed=11)
    to_t = lambda u: torch.from_numpy(u.astype(np.float32).transpose(0, 3, 1, 2)) / 127.5 - 1.0
    with torch.no_grad():
        want_v, want_map = torch_lpips(seq, taps, lins, to_t(a), to_t(b))
    bg = np.zeros((2,) + hw, bool)
    bg[:, :, : hw[1] // 3] = True
    bg[1, :4] = True
    scorer = S.LPIPSScorer(cfg, trunk, heads)
    res = scorer(a, b, bg)
    got_map = S.lpips_map(cfg, trunk, heads, a, b)
    want_bg = np.array([want_map[i].numpy()[bg[i]].mean() for i in range(2)])
    errs = (np.abs(res["lpips"] - want_v.numpy()).max(), np.abs(got_map - want_map.numpy()).max(),
            np.abs(res["bg_lpips"] - want_bg).max())
    print(f"LPIPS-{net} parity (independent torch formula): value {errs[0]:.2e}, map {errs[1]:.2e}, "
          f"BG-LPIPS {errs[2]:.2e} (values {want_v.numpy()}) ({time.perf_counter() - t0:.1f}s)")
    assert max(errs) <= TOL
    np.testing.assert_allclose(res["bg_fraction"], bg.mean(axis=(1, 2)), rtol=1e-6)
    same = scorer(a, a, bg)
    assert np.all(same["bg_lpips"] == 0.0) and np.all(same["lpips"] == 0.0)
    assert np.isnan(scorer(a, b, np.zeros_like(bg))["bg_lpips"]).all()


# --- the CLI -------------------------------------------------------------------------------------

def _write_item(folder, edit, mask, source_word, target_words, source_path=None, source_png=None, meta_text=None):
    os.makedirs(folder, exist_ok=True)
    if edit is not None:
        Image.fromarray(edit).save(os.path.join(folder, "edit.png"))
    if mask is not None:
        Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
    if source_png is not None:
        Image.fromarray(source_png).save(os.path.join(folder, "source.png"))
    meta = {"prompts": {"source_prompt": f"a photo of a {source_word}", "target_prompt": f"a photo of a {target_words}",
                        "source_word": source_word, "target_words": target_words},
            "image": {"path": source_path, "size": list(edit.shape[:2]) if edit is not None else None}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write(meta_text if meta_text is not None else json.dumps(meta))


@pytest.fixture(scope="module")
def results(tiny):
    """Two methods x two tasks (3 + 1 images), plus broken items; 'Identity' edits are the sources."""
    root = tiny["root"] / "results"
    srcs = _images(4, 32, 32, seed=20)
    edits = _images(4, 32, 32, seed=21)
    src_dir = root / "sources"
    os.makedirs(src_dir)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    tasks = [("cat", "dog"), ("cat", "dog"), ("cat", "dog"), ("dog", "cat")]  # RD needs >= 2 (n = 2: RD = 0)
    recs = []
    for i, (s, t) in enumerate(tasks):
        p = str(src_dir / f"img{i}.png")
        Image.fromarray(srcs[i]).save(p)
        # "Identity": a dataset run with results.jsonl, edit == source, source via meta image.path
        _write_item(str(root / "identity" / f"img{i}"), srcs[i], mask, s, t, source_path=p)
        recs.append({"id": f"img{i}", "status": "ok", "paths": {"meta.json": str(root / "identity" / f"img{i}" / "meta.json")}})
        # "Edit": plain subfolders, source.png stored in the folder
        _write_item(str(root / "edit" / f"img{i}"), edits[i], mask, s, t, source_png=srcs[i])
    recs.append({"id": "broken", "status": "error", "paths": {}, "error": "CUDA out of memory"})
    with open(root / "identity" / "results.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n{torn line\n")
    _write_item(str(root / "edit" / "noedit"), None, mask, "cat", "dog")  # missing edit.png
    _write_item(str(root / "edit" / "badmeta"), edits[0], mask, "cat", "dog", meta_text="{not json")
    return dict(root=root, srcs=srcs, edits=edits, mask=mask)


def test_evaluate_cli_end_to_end(tiny, results, tmp_path, capsys):
    from csg_jax import evaluate

    t0 = time.perf_counter()
    root = results["root"]
    out = tmp_path / "eval"
    rc = evaluate.main(["--results", f"Identity={root / 'identity'}", "--results", f"Edit={root / 'edit'}",
                        "--clip", tiny["clip_dir"], "--dino", tiny["dino_dir"], "--dino-size", "32",
                        "--vgg", tiny["vgg_file"], "--lpips", tiny["lpips_vgg"], "--out", str(out),
                        "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3, err  # some items were broken: reported, not fatal
    for name in ("metrics.csv", "summary.csv", "table.md", "report.json", "cs.png", "sd.png", "rd.png", "bg_lpips.png"):
        assert (out / name).is_file(), name
    import csv

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    by = {(r["method"], r["id"]): r for r in rows}
    assert by[("Identity", "broken")]["status"] == "failed" and "out of memory" in by[("Identity", "broken")]["error"]
    assert by[("Edit", "noedit")]["status"] == "corrupt" and "edit.png" in by[("Edit", "noedit")]["error"]
    assert by[("Edit", "badmeta")]["status"] == "corrupt" and "meta.json" in by[("Edit", "badmeta")]["error"]
    assert "torn line" in err or "not JSON" in err
    # identical images: SD = 0, BG-LPIPS = 0, CS = CS of the source with the target prompt
    lc = load_clip(tiny["clip_dir"])
    cs_src = S.ClipSimilarity(lc)(results["srcs"], [f"a photo of a {t}" for t in ("dog", "dog", "dog", "cat")])["cs"]
    for i in range(4):
        r = by[("Identity", f"img{i}")]
        assert r["status"] == "ok" and float(r["sd"]) == 0.0 and float(r["bg_lpips"]) == 0.0 and float(r["lpips"]) == 0.0
        assert float(r["cs"]) == pytest.approx(float(cs_src[i]), abs=1e-5)
        e = by[("Edit", f"img{i}")]
        assert float(e["sd"]) > 0 and float(e["bg_lpips"]) > 0 and e["mask"] == "own mask.png"
        assert float(e["bg_fraction"]) == pytest.approx(1 - 256 / 1024)
    summary = {(s["method"], s["task"]): s for s in csv.DictReader(open(out / "summary.csv"))}
    assert float(summary[("Identity", "cat → dog")]["rd"]) == pytest.approx(0.0, abs=1e-9)
    assert summary[("Identity", "cat → dog")]["rd_n"] == "3" and summary[("Identity", "dog → cat")]["rd"] == ""
    assert float(summary[("Edit", "cat → dog")]["rd"]) > 0
    rep = json.load(open(out / "report.json"))
    assert rep["rd"]["Edit|dog → cat"]["rd_note"] == "needs >= 2 images"
    table = (out / "table.md").read_text()
    assert "| cat → dog |" in table and "**0.0000**" in table and "BG-LPIPS" in table
    assert "noedit" in table and "Skipped metrics" not in table
    print(f"evaluate end to end: {time.perf_counter() - t0:.1f}s\n{table}")


def test_evaluate_skips_metrics_without_weights(results, tmp_path, capsys):
    from csg_jax import evaluate

    out = tmp_path / "eval"
    rc = evaluate.main(["--results", f"Edit={results['root'] / 'edit'}", "--dino", str(tmp_path / "no-such-dino"),
                        "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3  # the broken items of the fixture
    assert "CS: skipped (no --clip folder given)" in err
    assert "DINO folder not found" in err
    report = json.load(open(out / "report.json"))
    assert set(report["skipped"]) == {"cs", "sd", "rd", "bg_lpips"} and report["metrics"] == []
    assert (out / "metrics.csv").is_file() and "Skipped metrics" in (out / "table.md").read_text()
    assert evaluate.main(["--results", f"X={tmp_path / 'nothing'}", "--out", str(out), "--quiet"]) == 2


def test_background_masks(tmp_path):
    from csg_jax.evaluation import Item, background_for

    fg = np.zeros((8, 8), np.uint8)
    fg[2:6, 2:6] = 200  # > 0.5: foreground
    fg[0, 0] = 127  # < 0.5: background
    a = Item("A", "x", "", edit=np.zeros((16, 16, 3), np.uint8), own_mask=fg)  # mask nearest-upscaled
    b = Item("B", "x", "", edit=np.zeros((16, 16, 3), np.uint8), own_mask=None)
    by = {"A": {"x": a}, "B": {"x": b}}
    bg, desc = background_for(a, "own", by)
    assert desc == "own mask.png" and bg.shape == (16, 16) and bg.sum() == 256 - 64 and bg[0, 0] and not bg[4, 4]
    assert background_for(b, "own", by) == (None, "no mask.png")
    bg_b, desc = background_for(b, "A", by)  # B evaluated on A's mask
    assert desc == "A mask.png" and np.array_equal(bg_b, bg)
    Image.fromarray(255 - fg).save(tmp_path / "x.png")
    bg_u, desc = background_for(b, str(tmp_path), by)
    assert desc.startswith("user ") and bg_u.sum() == 64  # inverted: the 4x4 (x2 upscaled) square
