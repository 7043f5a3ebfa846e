"""Parity of csg_jax.models.clip_text.CLIPTextModel with transformers' CLIPTextModel (fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from csg_jax.convert import flatten, flax_to_state_dict, state_dict_to_flax
from csg_jax.errors import ConfigError
from csg_jax.models.clip_text import IGNORE_KEYS, CLIPTextConfig, CLIPTextModel, canonical_keys

torch.set_num_threads(1)

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=998, eos_token_id=999, pad_token_id=1)  # ids inside the tiny vocab

# text_encoder/config.json of SD 1.5 and SD 2.x as published (abridged to the fields that matter
# plus some bookkeeping that must be ignored).
SD1_CONFIG = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
              "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
              "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
              "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12,
              "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408}
SD2_CONFIG = {**SD1_CONFIG, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
              "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}


def _build(tmp_path, hidden_act):
    """Random transformers model with non-trivial norms/biases, round-tripped through safetensors."""
    torch.manual_seed(0)
    tmodel = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act)).eval()
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tmodel.save_pretrained(tmp_path, safe_serialization=True)
    sd = load_file(str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json") as f:
        config = CLIPTextConfig.from_dict(json.load(f))
    model = CLIPTextModel(config)
    ids = jnp.zeros((2, 77), jnp.int32)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    return tmodel, sd, model, template


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_last_hidden_state_matches_transformers(tmp_path, hidden_act):
    tmodel, sd, model, template = _build(tmp_path, hidden_act)
    sd = canonical_keys(sd)
    # SD checkpoints written by older transformers also hold this buffer: it must be skipped.
    sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    params = state_dict_to_flax(sd, template, ignore=IGNORE_KEYS)

    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 77))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))

    assert got.shape == want.shape == (2, 77, 32)
    err = float(np.abs(got - want).max())
    print(f"{hidden_act}: max abs err {err:.3e} (output scale {np.abs(want).max():.2f})")
    assert err <= 1e-4


def test_convert_round_trip(tmp_path):
    _, sd, _, template = _build(tmp_path, "quick_gelu")
    sd = canonical_keys(sd)
    params = state_dict_to_flax(sd, template, ignore=IGNORE_KEYS)

    back = flax_to_state_dict(params)
    want = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    again = flatten(state_dict_to_flax(back, template))
    flat = flatten(params)
    assert again.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(again[k], flat[k], err_msg="/".join(k))


def test_canonical_keys_accepts_both_layouts():
    sd = {"text_model.final_layer_norm.weight": 1, "final_layer_norm.bias": 2}
    assert canonical_keys(sd) == {"text_model.final_layer_norm.weight": 1, "text_model.final_layer_norm.bias": 2}


@pytest.mark.parametrize("config, hidden, n_params", [(SD1_CONFIG, 768, 123_060_480),
                                                      (SD2_CONFIG, 1024, 340_387_840)])
def test_sd_configs_shapes(config, hidden, n_params):
    model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), ids)
    assert out.shape == (1, 77, hidden)
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables)) == n_params


def test_unsupported_config_raises():
    with pytest.raises(ConfigError, match="hidden_act='relu6'"):
        CLIPTextConfig.from_dict({**SD1_CONFIG, "hidden_act": "relu6"})
    with pytest.raises(ConfigError, match="divisible"):
        CLIPTextConfig.from_dict({**SD1_CONFIG, "num_attention_heads": 7})
    with pytest.raises(ConfigError, match="model_type"):
        CLIPTextConfig.from_dict({**SD1_CONFIG, "model_type": "clip"})


def test_too_many_tokens_raises():
    model = CLIPTextModel(CLIPTextConfig.from_dict(SD1_CONFIG))
    with pytest.raises(ValueError, match="tokens <= 77"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 78), jnp.int32))
