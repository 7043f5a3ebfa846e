"""PIE-Bench's metrics (metrics/pixel.py, the SqueezeNet LPIPS trunk, CLIPScore, --pie-bench).

Oracles written here, independent of the code under test: the Gaussian-window SSIM / PSNR / MSE
formulas in float64 numpy; torchvision's ``squeezenet1_1().features`` layout in torch ``nn`` (no
torchvision here) with lpips v0.1's formula (``torch_lpips`` of test_metrics); transformers' torch
CLIPModel and ViTModel on tiny random weights. Images are tiny so each scorer compiles once or twice.
"""

import csv
import json
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
import transformers
from PIL import Image

from csg_jax.metrics import pixel as P
from csg_jax.metrics import scores as S
from csg_jax.metrics import vgg as V
from csg_jax.metrics.vit import load_clip, load_dino
from csg_jax.pie_bench import encode_mask
from test_metrics import _images, make_tiny_weights, splice_self_sim, torch_lpips

torch.set_num_threads(1)
SQ_W = (8, (4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 12, 12), (4, 12, 12), (4, 16, 16), (4, 16, 16))
SQ_TAPS = {1: "relu1", 4: "relu2", 7: "relu3", 9: "relu4", 10: "relu5", 11: "relu6", 12: "relu7"}


# --- oracles -------------------------------------------------------------------------------------

def np_pixel_metrics(a_u8, b_u8, keep):
    """float64 MSE, PSNR, SSIM (11x11 Gaussian window, sigma 1.5, valid positions, data range 1)
    of one (H, W, 3) uint8 pair, both times ``keep`` (H, W)."""
    k = keep.astype(np.float64)[..., None]
    a, b = a_u8 / 255.0 * k, b_u8 / 255.0 * k
    mse = np.mean((a - b) ** 2)
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    d = np.arange(11) - 5.0
    g = np.exp(-d ** 2 / (2 * 1.5 ** 2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    win = lambda x: np.einsum("hwcij,ij->hwc", np.lib.stride_tricks.sliding_window_view(x, (11, 11), axis=(0, 1)), w2)
    mu_a, mu_b = win(a), win(b)
    va, vb = np.maximum(win(a * a) - mu_a ** 2, 0), np.maximum(win(b * b) - mu_b ** 2, 0)
    cov = win(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return mse, psnr, s.mean()


class TorchFire(tnn.Module):
    """torchvision.models.squeezenet.Fire."""

    def __init__(self, cin, s, e1, e3):
        super().__init__()
        self.squeeze, self.expand1x1 = tnn.Conv2d(cin, s, 1), tnn.Conv2d(s, e1, 1)
        self.expand3x3 = tnn.Conv2d(s, e3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def torch_squeezenet1_1_features(w):
    """torchvision.models.squeezenet1_1().features with other widths: same layer indices."""
    fires, cin = [], w[0]
    for s, e1, e3 in w[1:]:
        fires.append(TorchFire(cin, s, e1, e3))
        cin = e1 + e3
    pool = lambda: tnn.MaxPool2d(3, 2, ceil_mode=True)
    return tnn.Sequential(tnn.Conv2d(3, w[0], 3, stride=2), tnn.ReLU(), pool(), fires[0], fires[1], pool(),
                          fires[2], fires[3], pool(), *fires[4:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pie_weights")
    t = make_tiny_weights(root)
    torch.manual_seed(1)
    sq = torch_squeezenet1_1_features(SQ_W).eval()
    with torch.no_grad():
        for p in sq.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {f"features.{k}": v for k, v in sq.state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(10, 16, 1, 1)  # torchvision's head: ignored
    torch.save(sd, root / "squeezenet1_1.pth")
    lins = [tnn.Conv2d(c, 1, 1, bias=False) for c in (8, 16, 16, 24, 24, 32, 32)]
    with torch.no_grad():
        for l in lins:
            l.weight.copy_(torch.rand_like(l.weight))
    torch.save({f"lin{k}.model.1.weight": l.weight.detach().clone() for k, l in enumerate(lins)}, root / "squeeze.pth")
    t.update(sq=sq, sq_file=str(root / "squeezenet1_1.pth"), sq_heads=str(root / "squeeze.pth"), sq_lins=lins)
    return t


# --- metrics -------------------------------------------------------------------------------------

def test_pixel_metrics_match_numpy_gaussian_formula():
    a, b = _images(2, 24, 29, seed=30), _images(2, 24, 29, seed=31)
    keep = np.ones((2, 24, 29), bool)
    keep[0, 5:15, 8:20] = False  # the edit region, zeroed in both
    keep[1, :, :3] = False
    b[1] = a[1]  # identical: MSE 0, PSNR inf, SSIM 1
    b[1, :, :3] = 0  # ... also where only the masked-out pixels differ
    got = P.PixelScorer(batch_size=2)(a, b, keep)
    want = np.array([np_pixel_metrics(a[i], b[i], keep[i]) for i in range(2)])
    e_mse = abs(got["mse"][0] - want[0, 0])
    e_psnr = abs(got["psnr"][0] - want[0, 1])
    e_ssim = abs(got["ssim"][0] - want[0, 2])
    print(f"pixel metrics vs float64 numpy: MSE {e_mse:.2e} (of {want[0, 0]:.4f}), PSNR {e_psnr:.2e} dB, "
          f"SSIM {e_ssim:.2e} (of {want[0, 2]:.4f})")
    assert e_mse <= 1e-6 * want[0, 0] + 1e-9 and e_psnr <= 1e-4 and e_ssim <= 2e-6
    assert got["mse"][1] == 0.0 and got["psnr"][1] == np.inf and abs(got["ssim"][1] - 1.0) < 1e-6
    assert want[1, 1] == math.inf and want[1, 2] == pytest.approx(1.0)


def test_squeezenet_lpips_parity(tiny):
    cfg, trunk = V.load_trunk(tiny["sq_file"], "squeezenet1_1")
    assert cfg.widths == SQ_W
    heads = V.load_heads(tiny["sq_heads"], cfg)
    hw = (37, 45)  # odd sizes: the ceil-mode pools keep a partial last window
    a, b = _images(2, *hw, seed=32), _images(2, *hw, seed=33)
    to_t = lambda u: torch.from_numpy(u.astype(np.float32).transpose(0, 3, 1, 2)) / 127.5 - 1.0
    with torch.no_grad():
        want_v, want_map = torch_lpips(tiny["sq"], SQ_TAPS, tiny["sq_lins"], to_t(a), to_t(b))
    res = S.LPIPSScorer(cfg, trunk, heads, batch_size=2)(a, b)
    got_map = S.lpips_map(cfg, trunk, heads, a, b)
    e_v, e_m = np.abs(res["lpips"] - want_v.numpy()).max(), np.abs(got_map - want_map.numpy()).max()
    print(f"LPIPS-squeeze parity: value {e_v:.2e}, map {e_m:.2e} (values {want_v.numpy()})")
    assert e_v <= 1e-4 and e_m <= 1e-4
    with pytest.raises(Exception, match="squeezenet1_1"):
        V.load_trunk(tiny["vgg_file"], "squeezenet1_1")


def test_clip_score_whole_and_masked_vs_torch_clip(tiny):
    lc = load_clip(tiny["clip_dir"])
    imgs = _images(2, 40, 48, seed=34)
    masks = np.zeros((2, 40, 48), bool)
    masks[0, 10:30, 12:40] = True
    masks[1, :20] = True
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    def torch_cos(images, prompts):
        ids = tiny["tok"](prompts, padding="max_length", max_length=77, return_tensors="pt")
        pv = proc(list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            i = tiny["clip"].get_image_features(pixel_values=pv)
            t = tiny["clip"].get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
        return torch.sum(i / i.norm(dim=-1, keepdim=True) * t / t.norm(dim=-1, keepdim=True), -1).numpy()

    sim = S.ClipSimilarity(lc, resample="pil", batch_size=2)
    prompts = ["blue square", "a"]  # positive cosines on this tiny random CLIP (whole and masked)
    whole, masked = sim.clip_score(imgs, prompts), sim.clip_score(imgs, prompts, masks)
    cos_w = torch_cos(imgs, prompts)
    cos_m = torch_cos(np.uint8(imgs * masks[..., None].astype(np.float32)), prompts)  # PIE-Bench's np.uint8(img * mask)
    assert (cos_w > 0).all() and (cos_m > 0).all()
    e_w, e_m = np.abs(whole - 100 * cos_w).max(), np.abs(masked - 100 * cos_m).max()
    print(f"CLIPScore x100 parity: whole {e_w:.2e}, masked {e_m:.2e} (values {100 * cos_w}, {100 * cos_m})")
    assert e_w <= 1e-3 and e_m <= 1e-3 and np.abs(cos_w - cos_m).min() > 1e-2
    neg = ["a photo of a cat"] * 2  # negative cosine: CLIPScore clamps to 0
    assert (torch_cos(imgs, neg) < 0).all() and (sim.clip_score(imgs, neg) == 0).all()


def test_pie_structure_distance_preprocessing(tiny):
    """PIE-Bench's SD input: 0..255 values ImageNet-normalised, Resize without antialias."""
    ld, tv = load_dino(tiny["dino_dir"]), tiny["dino"]
    src, edit = _images(2, 40, 56, seed=35), _images(2, 40, 56, seed=36)
    keys = {}
    hook = tv.layers[-1].attention.k_proj.register_forward_hook(lambda m, i, o: keys.__setitem__("k", o))
    try:
        def torch_ssim(u8):
            x = torch.from_numpy(u8.astype(np.float32).transpose(0, 3, 1, 2))
            x = F.interpolate(x, size=(32, 44), mode="bilinear", antialias=False, align_corners=False)
            x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            with torch.no_grad():
                tv(x, interpolate_pos_encoding=True)
            return splice_self_sim(keys["k"])

        want = ((torch_ssim(src) - torch_ssim(edit)) ** 2).mean(dim=(1, 2)).numpy()
    finally:
        hook.remove()
    got = S.StructureDistance.pie_bench(ld, size=32, batch_size=2)(src, edit)
    e = np.abs(got - want).max()
    print(f"PIE structure distance parity: {e:.2e} (values {want})")
    assert e <= 1e-4 * max(1.0, np.abs(want).max())


# --- the CLI ---------------------------------------------------------------------------------------

def _pie_fixture(root):
    """annotation_images + mapping_file.json (4 good entries, 2 malformed) + two methods' results."""
    imgs = root / "annotation_images"
    srcs = _images(4, 32, 32, seed=40)
    big = _images(1, 48, 64, seed=41)[0]  # 64x48 source, edited at 32x32: fitted like translate does
    edits = _images(4, 32, 32, seed=42)
    masks = np.zeros((4, 32, 32), bool)
    masks[0, 8:20, 10:24] = True
    masks[1, 16:, :] = True
    masks[2] = True  # everything edited: no unedited part -> nan
    big_mask = np.zeros((48, 64), bool)
    big_mask[10:30, 20:50] = True
    mapping = {}
    for i in range(4):
        rel = f"{i}_type/{i:03d}.png"
        os.makedirs(imgs / f"{i}_type", exist_ok=True)
        Image.fromarray(big if i == 3 else srcs[i]).save(imgs / rel)
        mapping[f"{i:03d}"] = {"image_path": rel, "original_prompt": "a photo of a [cat]",
                               "editing_prompt": "a photo of a [dog]", "editing_instruction": "",
                               "editing_type_id": str(i % 2 + 1), "blended_word": "cat dog",
                               "mask": encode_mask(big_mask if i == 3 else masks[i])}
    mapping["bad1"] = {"image_path": "x.png", "original_prompt": "a", "editing_prompt": "b", "mask": [1, 2, 3]}
    mapping["bad2"] = "not an object"
    with open(root / "mapping_file.json", "w") as f:
        json.dump(mapping, f)
    fitted = np.asarray(Image.fromarray(big).resize((43, 32), Image.BICUBIC))[:, 5:37]  # 64x48 -> 43x32 -> crop
    bordered = big_mask.copy()  # the official sets the border on the source's own grid
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = True
    fit_mask = np.asarray(Image.fromarray(bordered.astype(np.uint8) * 255).resize((43, 32), Image.NEAREST))[:, 5:37] > 127
    sources = list(srcs[:3]) + [fitted]
    for name, outs, ids in (("identity", sources, ["000", "001", "002", "003"]), ("edit", edits, ["000", "001", "zzz"])):
        recs = []
        for rid, img in zip(ids, outs):
            d = root / name / rid
            os.makedirs(d)
            Image.fromarray(np.ascontiguousarray(img)).save(d / "edit.png")
            with open(d / "meta.json", "w") as f:
                json.dump({"prompts": {"source_prompt": "a photo of a cat", "target_prompt": "a photo of a dog"}}, f)
            recs.append({"id": rid, "status": "ok", "paths": {"edit.png": str(d / "edit.png")}})
        with open(root / name / "results.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in recs) + "\n")
    full = []
    for m in masks[:3]:
        m = m.copy()
        m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True  # the official's border
        full.append(m)
    full.append(fit_mask)
    return dict(srcs=sources, edits=edits, masks=full)


def test_pie_bench_cli_end_to_end(tiny, tmp_path, capsys):
    from csg_jax import evaluate
    from csg_jax.evaluation import EvalSettings, run_evaluation

    t0 = time.perf_counter()
    fx = _pie_fixture(tmp_path)
    out = tmp_path / "eval"
    common = ["--results", f"Identity={tmp_path / 'identity'}", "--results", f"Edit={tmp_path / 'edit'}",
              "--pie-bench", str(tmp_path / "mapping_file.json"), "--images", str(tmp_path / "annotation_images"),
              "--batch-size", "2", "--quiet"]
    rc = evaluate.main(common + ["--clip", tiny["clip_dir"], "--dino", tiny["dino_dir"], "--dino-size", "32",
                                 "--lpips-net", "squeeze", "--squeeze", tiny["sq_file"], "--lpips", tiny["sq_heads"],
                                 "--by-edit-type", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3, err  # malformed entries and an unknown id: reported, not fatal
    for name in ("pie_metrics.csv", "pie_summary.csv", "pie_table.md", "report.json", "metrics.csv", "table.md"):
        assert (out / name).is_file(), name
    rows = {(r["method"], r["id"]): r for r in csv.DictReader(open(out / "pie_metrics.csv"))}
    assert ("Edit", "zzz") not in rows and len(rows) == 6
    for i in ("000", "001", "003"):  # identical edit: PSNR inf, MSE 0, SSIM 1, structure 0, LPIPS 0
        r = rows[("Identity", i)]
        assert r["psnr"] == "inf" and float(r["mse"]) == 0 and float(r["ssim"]) == pytest.approx(1, abs=1e-6), r
        assert float(r["structure"]) == 0 and float(r["lpips"]) == 0 and float(r["clip_whole"]) >= 0
    r = rows[("Identity", "002")]  # mask covers everything: no unedited part
    assert r["psnr"] == r["mse"] == r["ssim"] == r["lpips"] == "" and r["clip_edited"] != ""
    for k, i in enumerate(("000", "001")):
        mse, psnr, ssim = np_pixel_metrics(fx["srcs"][k], fx["edits"][k], ~fx["masks"][k])
        r = rows[("Edit", i)]
        assert float(r["mse"]) == pytest.approx(mse, rel=1e-4) and float(r["psnr"]) == pytest.approx(psnr, abs=1e-3)
        assert float(r["ssim"]) == pytest.approx(ssim, abs=1e-5) and float(r["structure"]) > 0
        assert float(r["mask_fraction"]) == pytest.approx(fx["masks"][k].mean(), rel=1e-5)
    assert float(rows[("Identity", "003")]["mask_fraction"]) == pytest.approx(fx["masks"][3].mean(), rel=1e-5)  # fitted mask (6-digit CSV)
    summary = {(s["method"], s["edit_type"]): s for s in csv.DictReader(open(out / "pie_summary.csv"))}
    want_mse = np.mean([np_pixel_metrics(fx["srcs"][k], fx["edits"][k], ~fx["masks"][k])[0] for k in range(2)])
    assert float(summary[("Edit", "all")]["mse"]) == pytest.approx(want_mse * 1e4, rel=1e-4)  # PIE units
    assert summary[("Identity", "all")]["n"] == "4" and ("Edit", "1") in summary and ("Edit", "2") in summary
    rep = json.load(open(out / "report.json"))
    assert rep["pie"]["mean"]["Edit"]["n"] == 2 and "bad1" in json.dumps(rep["problems"])
    assert "bad2" in json.dumps(rep["problems"]) and "zzz" in json.dumps(rep["problems"])
    table = (out / "pie_table.md").read_text()
    assert "MSE ×10⁴" in table and "| Identity |" in table and "1: change object" in table and "69.43" in table

    # no weights at all: PSNR / MSE / SSIM still computed, the network columns skipped naming their flags
    res = run_evaluation(EvalSettings(results=(("Edit", str(tmp_path / "edit")),), pie_bench=str(tmp_path / "mapping_file.json"),
                                      images=str(tmp_path / "annotation_images"), out=str(tmp_path / "e2"), quiet=True,
                                      batch_size=2))
    err = capsys.readouterr().err
    assert set(res["pie"]["columns"]) == {"psnr", "mse", "ssim"}
    assert res["pie"]["mean"]["Edit"]["mse"] == pytest.approx(want_mse * 1e4, rel=1e-4)
    assert res["pie"]["mean"]["Edit"]["ssim"] == pytest.approx(float(summary[("Edit", "all")]["ssim"]), rel=1e-5)
    assert "--dino DIR" in err and "--squeeze FILE" in err and "--clip DIR" in err and "| Edit |" in err
    # a missing weight file: a message naming it, no traceback; malformed mapping file: exit 2
    rc = evaluate.main(common[:4] + common[4:] + ["--lpips-net", "squeeze", "--squeeze", str(tmp_path / "nope.pth"),
                                                  "--lpips", tiny["sq_heads"], "--out", str(tmp_path / "e3")])
    err = capsys.readouterr().err
    assert rc == 3 and "nope.pth" in err and "Traceback" not in err
    (tmp_path / "broken.json").write_text("[1, 2]")
    assert evaluate.main(common[:4] + ["--pie-bench", str(tmp_path / "broken.json"), "--out", str(tmp_path / "e4")]) == 2
    assert "mapping file is one JSON object" in capsys.readouterr().err
    print(f"PIE-Bench end to end: {time.perf_counter() - t0:.1f}s\n{table}")
