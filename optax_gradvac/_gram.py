"""Pure helpers on ``[T, T]`` Gram matrices, shared by the methods."""

import jax
import jax.numpy as jnp

from optax_gradvac import _checks


def normalise(gram: jax.Array) -> jax.Array:
  """Divides a Gram matrix by its largest diagonal entry.

  For a method that uses only ratios of Gram entries this changes no result; it
  keeps products of squared norms far from overflow and underflow whatever the
  gradients' scale.
  """
  scale = jnp.max(jnp.diagonal(gram))
  return gram / jnp.where(scale > 0, scale, 1)


def cosine(dot: jax.Array, sq_norm_a: jax.Array, sq_norm_b: jax.Array) -> jax.Array:
  """Cosine from a dot product and two squared norms; 0 where a norm is 0.

  ``dot / sqrt(|a|^2 |b|^2)`` rather than ``dot / (|a| |b|)``: for identical
  vectors the former is exactly 1 in floating point, so a task never corrects
  its own copy because of a rounding error.
  """
  denominator = sq_norm_a * sq_norm_b
  positive = denominator > 0
  value = dot / jnp.sqrt(jnp.where(positive, denominator, 1))
  return jnp.where(positive, jnp.clip(value, -1, 1), 0)


def pairwise_cosine(gram: jax.typing.ArrayLike) -> jax.Array:
  """Cosine similarity of every pair of vectors from their Gram matrix.

  Args:
    gram: ``[..., T, T]`` Gram matrix, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[..., T, T]`` cosines in ``[-1, 1]``; 0 in the rows and columns of zero
    vectors.
  """
  gram = jnp.asarray(gram)
  _checks.check_gram("pairwise_cosine", gram)
  gram = jax.vmap(normalise)(gram.reshape(-1, *gram.shape[-2:])).reshape(gram.shape)
  sq_norms = jnp.diagonal(gram, axis1=-2, axis2=-1)
  return cosine(gram, sq_norms[..., :, None], sq_norms[..., None, :])


def spectrum(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of a ``[T, T]`` Gram matrix, rounding-level eigenvalues set to 0.

  An eigenvalue at most ``T * eps * largest`` (``eps`` of the dtype: 1.2e-7 in
  float32) cannot be told from 0 in the Gram matrix's own rounding, so it is
  set to 0: the rank rule of ``numpy.linalg.matrix_rank`` and of Aligned-MTL's
  official code. A zero gradient gives a zero eigenvalue.

  Returns:
    ``(eigenvalues, eigenvectors)``: ``[T]`` non-negative, ascending, and
    ``[T, T]`` orthonormal columns, ``gram = vectors @ diag(values) @ vectors.T``.
  """
  values, vectors = jnp.linalg.eigh(gram)
  tolerance = gram.shape[-1] * jnp.finfo(values.dtype).eps * jnp.max(values)
  return jnp.where(values > tolerance, values, 0), vectors


def pseudo_inverse(gram: jax.Array) -> jax.Array:
  """Moore-Penrose pseudo-inverse of a ``[T, T]`` Gram matrix, on its :func:`spectrum`."""
  values, vectors = spectrum(gram)
  kept = values > 0
  inverse = jnp.where(kept, 1 / jnp.where(kept, values, 1), 0)
  return jnp.matmul(vectors * inverse, vectors.T, precision=jax.lax.Precision.HIGHEST)
