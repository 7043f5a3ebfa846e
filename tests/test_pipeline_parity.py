"""Our Flax SD stack vs. diffusers / transformers (PyTorch) loaded from the same folder."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

import jax
import jax.numpy as jnp

TOL = 1e-4


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def variant(request, tiny_sd1_dir, tiny_sd2_dir, tiny_sd1, tiny_sd2):
    if request.param == "sd1":
        return tiny_sd1_dir, tiny_sd1
    return tiny_sd2_dir, tiny_sd2


def test_unet_matches_diffusers(variant):
    folder, pipe = variant
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    rs = np.random.RandomState(0)
    x = rs.randn(2, 16, 16, 4).astype(np.float32)
    ctx = rs.randn(2, 77, pipe.unet.config.cross_attention_dim).astype(np.float32)
    t = np.array([981, 21])
    ours, _ = pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx)
    with torch.no_grad():
        theirs = _nhwc(ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    err = np.abs(np.asarray(ours) - theirs).max()
    print(f"unet max abs err {err:.2e}")
    assert err <= TOL


def test_vae_matches_diffusers(variant):
    folder, pipe = variant
    ref = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    rs = np.random.RandomState(1)
    img = rs.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mean, logvar = pipe.vae.apply({"params": pipe.params["vae"]}, img, method=type(pipe.vae).encode)
    z = rs.randn(1, 16, 16, 4).astype(np.float32)
    dec = pipe.vae.apply({"params": pipe.params["vae"]}, z, method=type(pipe.vae).decode)
    with torch.no_grad():
        dist = ref.encode(_nchw(img)).latent_dist
        ref_dec = _nhwc(ref.decode(_nchw(z)).sample)
    errs = [np.abs(np.asarray(mean) - _nhwc(dist.mean)).max(), np.abs(np.asarray(logvar) - _nhwc(dist.logvar)).max(),
            np.abs(np.asarray(dec) - ref_dec).max()]
    print("vae mean/logvar/decode max abs err", errs)
    assert max(errs) <= TOL


def test_text_encoder_and_tokenizer_match_transformers(variant):
    folder, pipe = variant
    ref = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    ref_tok = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    prompts = ["a photo of a cat sitting on the grass", "a red circle on a blue background"]
    ids = pipe.tokenize(prompts)
    ref_ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref_ids)
    ours = np.asarray(pipe.embed_ids(ids))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    err = np.abs(ours - theirs).max()
    print(f"text encoder max abs err {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_sd15_shaped_unet_matches_diffusers():
    """The real SD-1.5 UNet architecture (320/640/1280/1280, 8 heads, cross dim 768), random weights."""
    from csg_jax.convert import state_dict_to_flax
    from csg_jax.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
    cfg = UNetConfig.from_dict(dict(ref.config))
    model = UNet2DConditionModel(cfg)
    rs = np.random.RandomState(0)
    x = rs.randn(1, 16, 16, 4).astype(np.float32)
    ctx = rs.randn(1, 77, 768).astype(np.float32)
    t = np.array([500])
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, ctx)["params"]
    params = state_dict_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, template)
    ours, _ = jax.jit(model.apply)({"params": params}, x, t, ctx)
    with torch.no_grad():
        theirs = _nhwc(ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    err = np.abs(np.asarray(ours) - theirs).max()
    print(f"SD-1.5-shaped unet max abs err {err:.2e} (output scale {np.abs(theirs).max():.2f})")
    assert err <= TOL
