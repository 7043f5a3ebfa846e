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
  multiplies the reference's columns (Prompt-to-Prompt's equalizer). Instead of columns,
  ``control.mix_ref_matrix`` ``(B, T, T)`` maps them linearly (reference column t =
  ``sum_s ref[..., s] M[s, t]``: Prompt-to-Prompt's released word-swap mapper), and
  ``control.mix_keep`` ``(B, T)`` adds ``keep * p[b]`` to the reference (its refinement keeps the
  target's own columns for new words). Columns, matrix, scale and keep apply to cross-attention
  layers only; a mixed self-attention layer blends whole rows.
  Recorded probabilities are the ones used, unless ``control.record_live`` asks for the
  layer's own softmax (before mix / inject).

An empty control (the default) costs nothing: layers then use :func:`fused_attention` (cuDNN's
flash attention on NVIDIA GPUs in bf16/fp16, XLA elsewhere).

Memory: at 512 px SD's 64x64 self-attention has 4096 x 4096 scores per head and image (0.5 GiB
per image in float32, x3 images in CSG's batched target branch), the largest buffer of every
program. Where the scores of a call would exceed :data:`LOGITS_BUDGET` elements, the XLA paths
work through the queries in chunks (softmax rows are independent, so the result is the same
computation row by row), keeping one chunk's scores live instead of all of them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from csg_jax.models.precision import Dense, is_half

RECORD_KINDS = ("probs", "head_mean", "token_mean")
LOGITS_BUDGET = 2**28  # attention-score elements computed at once (1 GiB in float32) before chunking


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
    mix_ref_matrix: Optional[jax.Array] = None  # (B, T, T) float, cross-attention only (instead of columns)
    mix_keep: Optional[jax.Array] = None  # (B, T) float, cross-attention only
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
    ref_scale: Optional[jax.Array] = None, ref_matrix: Optional[jax.Array] = None, keep: Optional[jax.Array] = None,
) -> jax.Array:
    """``weight * probs + (1 - weight) * (ref * ref_scale + keep * probs)`` with ``ref`` =
    ``ref_probs[..., ref_columns]`` or ``ref_probs @ ref_matrix`` (rows are not renormalised).

    probs, ref_probs: (B, N, Q, T); weight: (B, Q) (broadcast over heads and tokens);
    ref_columns: (B, T) int, the column of ``ref_probs`` that stands in for each column;
    ref_matrix: (B, T, T) float, instead of ref_columns: column t of the reference is
    ``sum_s ref_probs[..., s] ref_matrix[s, t]``;
    ref_scale: (B, T) float, a factor per (reordered) reference column;
    keep: (B, T) float, the share of the layer's own column added to the reference.
    """
    if ref_matrix is not None:
        ref_probs = jnp.einsum("bnqs,bst->bnqt", ref_probs, ref_matrix.astype(ref_probs.dtype))
    elif ref_columns is not None:
        ref_probs = jnp.take_along_axis(ref_probs, ref_columns[:, None, None, :], axis=-1)
    if ref_scale is not None:
        ref_probs = ref_probs * ref_scale[:, None, None, :].astype(ref_probs.dtype)
    if keep is not None:
        ref_probs = ref_probs + probs * keep[:, None, None, :].astype(probs.dtype)
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
        dense = lambda n, bias, name: Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        is_cross = context is not None
        context = x if context is None else context
        b, q_len, _ = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        q = split(dense(inner, False, "to_q")(x))
        k = split(dense(inner, False, "to_k")(context))
        v = split(dense(inner, False, "to_v")(context))

        record = None
        if control is None or not control.touches(self.layer_name):
            out = fused_attention(q, k, v)  # (B, Q, N, hd)
        else:
            name = self.layer_name
            kind = control.record_kind(name)

            def rows(q_rows, mix_rows, inject_rows):
                """The layer on a block of query rows: (B, c, N, hd) -> out (B, c, N, hd), record."""
                probs = live = self.probabilities(q_rows, k)
                if mix_rows is not None:
                    ref = probs[control.mix_ref_rows]
                    if is_cross:
                        probs = blend_probs(probs, ref, mix_rows, control.mix_ref_columns, control.mix_ref_scale,
                                            control.mix_ref_matrix, control.mix_keep)
                    else:
                        probs = blend_probs(probs, ref, mix_rows)
                if inject_rows is not None:
                    probs = jnp.broadcast_to(inject_rows.astype(probs.dtype), probs.shape)
                rec = None
                if kind is not None:
                    rec = summarise_probs(live if control.record_live else probs, kind, control.token_columns)
                out = jnp.einsum("bnqt,btnd->bqnd", probs.astype(v.dtype), v,
                                 preferred_element_type=jnp.float32 if is_half(v.dtype) else None)
                return out.astype(v.dtype), rec

            row_args = ((q, 1), (control.mix.get(name), 1), (control.inject.get(name), 2))
            out_axes = (1, 2 if kind == "probs" else 1)
            chunk = query_chunk(b, self.heads, q_len, k.shape[1])
            out, record = map_query_chunks(rows, chunk, q_len, row_args, out_axes)
        out = out.reshape(b, q_len, inner)
        return dense(self.query_dim, True, "to_out_0")(out), record

    def probabilities(self, q, k):
        """Softmax(q k^T / sqrt(d)) as (B, N, Q, T); computed in float32 for stability."""
        compute = jnp.float32 if (self.upcast or self.dtype != jnp.float32) else self.dtype
        scores = jnp.einsum("bqnd,btnd->bnqt", q.astype(compute), k.astype(compute))
        scores = scores * (self.head_dim**-0.5)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)


# -- memory-bounded attention ---------------------------------------------------------------------

def query_chunk(batch: int, heads: int, q_len: int, t_len: int, budget: Optional[int] = None) -> int:
    """Query rows per chunk so that one chunk's scores (batch, heads, chunk, t_len) stay within
    ``budget`` elements (default :data:`LOGITS_BUDGET`): ``q_len`` itself when all of them do, else
    its largest divisor that fits."""
    budget = LOGITS_BUDGET if budget is None else budget
    if batch * heads * q_len * t_len <= budget:
        return q_len
    want = max(1, budget // (batch * heads * t_len))
    return max(d for d in range(1, min(want, q_len) + 1) if q_len % d == 0)


def map_query_chunks(f: Callable, chunk: int, q_len: int, row_args, out_axes):
    """``f(*rows)`` over blocks of ``chunk`` query rows, one block at a time (``lax.map``).

    ``row_args``: ((array or None, axis of its q_len rows), ...); ``out_axes``: the q axis of each
    output (None outputs stay None). With ``chunk == q_len`` this is ``f(*arrays)``."""
    arrays = [a for a, _ in row_args]
    if chunk == q_len:
        return f(*arrays)
    n = q_len // chunk

    def split(a, axis):  # (..., q_len, ...) -> (n, ..., chunk, ...)
        a = a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    blocks = [None if a is None else split(a, axis) for a, axis in row_args]
    present = [i for i, a in enumerate(blocks) if a is not None]

    def body(xs):
        full = [None] * len(blocks)
        for i, x in zip(present, xs):
            full[i] = x
        return f(*full)

    outs = jax.lax.map(body, [blocks[i] for i in present])

    def join(o, axis):  # (n, ..., chunk, ...) -> (..., q_len, ...)
        o = jnp.moveaxis(o, 0, axis)
        return o.reshape(o.shape[:axis] + (q_len,) + o.shape[axis + 2 :])

    return tuple(None if o is None else join(o, axis) for o, axis in zip(outs, out_axes))


def _cudnn_supported(q, k) -> bool:
    """cuDNN flash attention: half-precision inputs, head dim a multiple of 8 up to 128, even
    sequence lengths (its gradient refuses odd ones: cross-attention's 77 text tokens stay on XLA,
    where their scores are small anyway)."""
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
            and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def fused_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for (B, Q, N, d) queries and (B, T, N, d) keys / values.

    On NVIDIA GPUs (chosen at lowering, so deviceless compiles for a GPU get it too) cuDNN's flash
    attention where it applies: no (Q, T) scores in memory, and the XLA GPU compiler's Triton
    tiling failure on the XLA attention's output projection does not arise. Elsewhere XLA's
    attention, in query chunks beyond :data:`LOGITS_BUDGET`. ``CSG_JAX_ATTENTION=xla`` forces the
    XLA path everywhere (to compare).
    """
    b, q_len, heads, _ = q.shape

    def xla(q, k, v):
        chunk = query_chunk(b, heads, q_len, k.shape[1])
        return map_query_chunks(lambda qr: (jax.nn.dot_product_attention(qr, k, v),), chunk, q_len, ((q, 1),), (1,))[0]

    if os.environ.get("CSG_JAX_ATTENTION", "auto") == "xla" or not _cudnn_supported(q, k) or not _cudnn_installed():
        return xla(q, k, v)
    return jax.lax.platform_dependent(q, k, v, cuda=_cudnn_attention, default=xla)


def _cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


@functools.cache
def _cudnn_installed() -> bool:
    """Whether the cuDNN path can be traced at all (it needs JAX's CUDA plugin, even to build the
    GPU branch of a program that runs elsewhere)."""
    x = jax.ShapeDtypeStruct((1, 8, 1, 8), jnp.bfloat16)
    try:
        jax.eval_shape(_cudnn_attention, x, x, x)
        return True
    except Exception:
        return False
