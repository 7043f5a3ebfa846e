"""A toy editing plug-in for tests/test_registry.py: the "edit" is the source reconstruction.

The whole of what a method needs: this file plus a registry line (here ``registry.register``).
"""

from csg_jax.editing.core import EditOutputs, source_pass

OPTIONS_KEY = "identity"
Options = None  # no settings of its own
DEFAULTS: dict = {}


def knobs(config):
    return None


def prepare(pipe, prompts, config):
    return prompts


def plan(pipe, latent_hw, layers, config):
    return None


def edit(run, x_T, prompts, knobs, method_knobs=None, uncond=None):
    source = source_pass(run.pipe, run.params, x_T, prompts, run.schedule, run.layers, uncond, knobs.guidance_scale)
    return EditOutputs(source.reconstruction, source.reconstruction, source.mask_raw, source.mask)


def unet_evaluations(config, stored_maps=False, guided=False):
    return {"source": 1, "target": 0}
