"""Multi-head attention whose probabilities are explicit state.

Editing methods (CSG, Prompt-to-Prompt, Pix2Pix-Zero) need to *read* attention
probabilities and sometimes *replace* them. Instead of hooks stashing maps on modules, a
caller passes an :class:`AttentionControl` pytree into the UNet and gets a ``records`` dict
back; every attention layer looks itself up in the control by its stable name, e.g.
``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"`` (diffusers' module path).

Shapes (per layer; ``B`` batch, ``N`` heads, ``Q`` = H*W query pixels, ``T`` key length:
77 text tokens for cross-attention ``attn2``, H*W for self-attention ``attn1``):

* record kind ``"probs"``      -> ``(B, N, Q, T)`` softmax probabilities;
* record kind ``"head_mean"``  -> ``(B, Q, T)`` probabilities averaged over heads;
* record kind ``"token_mean"`` -> ``(B, Q, K)`` head-mean of the ``K`` token columns in
  ``control.token_columns`` (``(B, K)`` int32);
* ``control.inject[name]``      ``(B, N, Q, T)`` or ``(B, 1, Q, T)``: used *instead of* the
  softmax (values are recomputed as usual);
* ``control.mix[name]``         ``(B, Q)`` weight ``w``: the layer's own probabilities are
  blended with a reference row of the same batch,
  ``p[b] <- w[b] * p[b] + (1 - w[b]) * p[ref_rows[b]][..., ref_columns[b]]``
  (see :func:`blend_probs`), with ``control.mix_ref_rows`` ``(B,)`` and
  ``control.mix_ref_columns`` ``(B, T)``; optionally ``control.mix_ref_scale`` ``(B, T)``
  multiplies the reference's columns (Prompt-to-Prompt's equalizer). Columns and scale apply
  to cross-attention layers only; a mixed self-attention layer blends whole rows.
  Recorded probabilities are the ones used, unless ``control.record_live`` asks for the
  layer's own softmax (before mix / inject).

An empty control (the default) costs nothing: layers then use the fused
``jax.nn.dot_product_attention`` (flash attention where the backend has it).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

RECORD_KINDS = ("probs", "head_mean", "token_mean")


@struct.dataclass
class AttentionControl:
    """What the attention layers of one UNet call record, and what they use instead of softmax.

    ``record`` is static (part of the jit cache key): a tuple of ``(layer_name, kind)``.
    Everything else is array data, so one compiled function serves any token columns,
    injected maps or mixing weights of the same shapes.
    """

    record: tuple[tuple[str, str], ...] = struct.field(pytree_node=False, default=())
    token_columns: Optional[jax.Array] = None  # (B, K) int32, for kind "token_mean"
    inject: Mapping[str, jax.Array] = struct.field(default_factory=dict)
    mix: Mapping[str, jax.Array] = struct.field(default_factory=dict)
    mix_ref_rows: Optional[jax.Array] = None  # (B,) int32
    mix_ref_columns: Optional[jax.Array] = None  # (B, T) int32, cross-attention only
    mix_ref_scale: Optional[jax.Array] = None  # (B, T) float, cross-attention only
    record_live: bool = struct.field(pytree_node=False, default=False)  # record softmax before mix/inject

    def record_kind(self, name: str) -> Optional[str]:
        for layer, kind in self.record:
            if layer == name:
                return kind
        return None

    def touches(self, name: str) -> bool:
        return self.record_kind(name) is not None or name in self.inject or name in self.mix


def blend_probs(
    probs: jax.Array, ref_probs: jax.Array, weight: jax.Array, ref_columns: Optional[jax.Array] = None,
    ref_scale: Optional[jax.Array] = None,
) -> jax.Array:
    """``weight * probs + (1 - weight) * ref_probs[..., ref_columns] * ref_scale`` (rows are not renormalised).

    probs, ref_probs: (B, N, Q, T); weight: (B, Q) (broadcast over heads and tokens);
    ref_columns: (B, T) int, the column of ``ref_probs`` that stands in for each column;
    ref_scale: (B, T) float, a factor per (reordered) reference column.
    """
    if ref_columns is not None:
        ref_probs = jnp.take_along_axis(ref_probs, ref_columns[:, None, None, :], axis=-1)
    if ref_scale is not None:
        ref_probs = ref_probs * ref_scale[:, None, None, :].astype(ref_probs.dtype)
    w = weight[:, None, :, None].astype(probs.dtype)
    return probs * w + ref_probs * (1 - w)


def summarise_probs(probs: jax.Array, kind: str, token_columns: Optional[jax.Array]) -> jax.Array:
    """Reduce ``(B, N, Q, T)`` probabilities to what a record of ``kind`` holds."""
    if kind == "probs":
        return probs
    if kind == "head_mean":
        return probs.mean(axis=1)
    if kind == "token_mean":
        if token_columns is None:
            raise ValueError("record kind 'token_mean' needs control.token_columns")
        cols = jnp.take_along_axis(probs, token_columns[:, None, None, :], axis=-1)
        return cols.mean(axis=1)
    raise ValueError(f"unknown record kind {kind!r}; expected one of {RECORD_KINDS}")


class Attention(nn.Module):
    """diffusers ``Attention`` (to_q / to_k / to_v without bias, to_out.0 with bias)."""

    query_dim: int
    heads: int
    head_dim: int
    layer_name: str = ""
    upcast: bool = False  # SD 2.x: scores and softmax in float32 even in bf16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, control: Optional[AttentionControl] = None):
        """x: (B, Q, C); context: (B, T, D) or None (self-attention). Returns (out, record|None)."""
        inner = self.heads * self.head_dim
        dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        is_cross = context is not None
        context = x if context is None else context
        b, q_len, _ = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        q = split(dense(inner, False, "to_q")(x))
        k = split(dense(inner, False, "to_k")(context))
        v = split(dense(inner, False, "to_v")(context))

        record = None
        if control is None or not control.touches(self.layer_name):
            out = jax.nn.dot_product_attention(q, k, v)  # (B, Q, N, hd)
        else:
            probs = live = self.probabilities(q, k)
            name = self.layer_name
            if name in control.mix:
                ref = probs[control.mix_ref_rows]
                columns, scale = (control.mix_ref_columns, control.mix_ref_scale) if is_cross else (None, None)
                probs = blend_probs(probs, ref, control.mix[name], columns, scale)
            if name in control.inject:
                probs = jnp.broadcast_to(control.inject[name].astype(probs.dtype), probs.shape)
            kind = control.record_kind(name)
            if kind is not None:
                record = summarise_probs(live if control.record_live else probs, kind, control.token_columns)
            out = jnp.einsum("bnqt,btnd->bqnd", probs.astype(v.dtype), v)
        out = out.reshape(b, q_len, inner)
        return dense(self.query_dim, True, "to_out_0")(out), record

    def probabilities(self, q, k):
        """Softmax(q k^T / sqrt(d)) as (B, N, Q, T); computed in float32 for stability."""
        compute = jnp.float32 if (self.upcast or self.dtype != jnp.float32) else self.dtype
        scores = jnp.einsum("bqnd,btnd->bnqt", q.astype(compute), k.astype(compute))
        scores = scores * (self.head_dim**-0.5)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)
