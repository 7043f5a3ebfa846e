"""Evaluation metrics of the paper (Sec. 5.2, Appendix A): CS, SD, RD and BG-LPIPS, in JAX.

``vit.py`` (CLIP image/text towers, DINO ViT), ``vgg.py`` (VGG-16 / AlexNet features, perceptual
distance, LPIPS, relational distance), ``preprocess.py`` (resizing and normalisation),
``scores.py`` (batched jitted scorers), ``pixel.py`` (PIE-Bench's PSNR / MSE / SSIM; its LPIPS uses
the SqueezeNet trunk of ``vgg.py``, its CLIP ``ClipSimilarity.clip_score``). ``python -m csg_jax.evaluate``
runs them over result folders.
"""

from csg_jax.metrics.vgg import relational_distance

__all__ = ["relational_distance"]
