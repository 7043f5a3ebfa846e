"""What determines a shapes-model training run: the recipes, the shared constants and
:class:`TrainConfig` (saved with each checkpoint), and the check that a resumed checkpoint has
this run's recipe. Imports nothing heavy (the CLI's ``--help`` and the pool workers load it).
"""

from __future__ import annotations

import dataclasses

# (beta_schedule, scaling_factor) of the two recipes we trained. "sd_latent" copies SD: its
# scaled-linear betas and the 0.18215 latent scale. On raw pixels (std 0.73) that leaves a
# per-pixel log10 SNR below 0 for every t > 30 and below -2 for half of them, so nearly all the
# training signal is about colours and placement, and outlines (the shape) are learned at about
# a point of accuracy per 1,000 steps. "pixel_cosine" is the usual pixel-space choice (Nichol &
# Dhariwal's cosine betas on [-1, 1] images): log10 SNR from +3.8 (t = 1) to -3.4 (t = 981),
# half of the steps above -0.3, and at the last sampling step less signal left (0.03 x0) than
# SD's 0.068, so the model still has to read the caption.
RECIPES = {"pixel_cosine": ("squaredcos_cap_v2", 1.0), "sd_latent": ("scaled_linear", 0.18215)}
DEFAULT_RECIPE = "pixel_cosine"
LEGACY_RECIPE = RECIPES["sd_latent"]  # of checkpoints saved before the recipe was recorded
SCALING_FACTOR = RECIPES[DEFAULT_RECIPE][1]  # 1.0: images in [-1, 1] are the "latents" as they are
IMAGE_SIZE = 32
EMPTY_ROW = 0  # row of "" in the caption table (the unconditional caption)
LOC_WORDS = ("color", "shape")  # caption attributes whose words the localisation term grounds


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved with each checkpoint)."""

    batch_size: int = 32
    steps: int = 30000  # most steps to train; also the LR schedule's horizon unless fitted to the budget
    pool_size: int = 100_000
    seed: int = 0
    lr: float = 3e-4
    warmup_steps: int = 500
    final_lr_fraction: float = 0.1  # cosine decays to lr * this at the horizon
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # classifier-free-guidance caption dropout
    t_focus: float = 0.0  # share of timesteps drawn from [t_focus_min, t_focus_max) instead of [0, T) (see sample_timesteps)
    t_focus_max: int = 400
    t_focus_min: int = 0
    token_embed_std: float = 1.0
    # Loss weight of the pixels near the object's outline: 1 + edge_weight there, 1 elsewhere (see
    # edge_bands). 0 is the plain MSE all runs before Nov 27 2026 used.
    edge_weight: float = 0.0
    edge_width: int = 2  # half-thickness of that band, in pixels
    # Weight of the word-localisation term (see localisation_loss): pulls the cross-attention of
    # the object-colour and shape words into the object's ground-truth mask. 0 (off) is what all
    # runs before Nov 28 2026 used. Only images with t < loc_t_max count (above it the object's
    # place cannot be read off x_t).
    loc_weight: float = 0.0
    loc_t_max: int = 900
    # Noise schedule and image scale (see RECIPES). The first runs used SD's ("sd_latent");
    # checkpoints saved without these fields were trained with it.
    beta_schedule: str = RECIPES[DEFAULT_RECIPE][0]
    scaling_factor: float = RECIPES[DEFAULT_RECIPE][1]
    dtype: str = "float32"  # activation dtype: float32 or bfloat16 (params and loss stay float32)
    remat: str = "auto"  # rematerialisation: auto | off | attention | full (see REMAT_MODES)


def check_recipe(saved: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint under another noise schedule or image scale (the weights
    would be trained on one and continued on the other). ``saved``: the checkpoint's config dict;
    one without the fields was trained with :data:`LEGACY_RECIPE`."""
    from csg_jax.errors import ConfigError

    schedule = saved.get("beta_schedule", LEGACY_RECIPE[0])
    scale = float(saved.get("scaling_factor", LEGACY_RECIPE[1]))
    if (schedule, scale) != (cfg.beta_schedule, float(cfg.scaling_factor)):
        names = {v: k for k, v in RECIPES.items()}
        raise ConfigError(
            f"the checkpoint was trained with beta_schedule={schedule}, scaling_factor={scale} "
            f"(recipe {names.get((schedule, scale), 'custom')}), this run asks for {cfg.beta_schedule}, "
            f"{cfg.scaling_factor}: pass --recipe {names.get((schedule, scale), '...')} to resume it, or a new "
            f"--out (optionally --init-from an export) to start the other recipe")
