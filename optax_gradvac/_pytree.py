"""Pytree plumbing: parameter groups, input checks, Gram matrices, recombination.

The two functions that touch the gradients, :func:`gram_matrices` and
:func:`weighted_sum`, each read every gradient once; everything between them
acts on ``[num_groups, T, T]`` arrays.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optax_gradvac import _checks

Granularity = str | Callable[[Any], Any]
GRANULARITIES = ("model", "layer", "tensor")
_PRECISION = jax.lax.Precision.HIGHEST

KeyPath = tuple[Any, ...]


def _path_of(path: KeyPath) -> KeyPath:
  # nnx.Param leaves flatten with a trailing `.value` at init but not in the
  # gradients that reach update: drop it so both derive the same groups.
  if path and path[-1] == jax.tree_util.GetAttrKey("value"):
    return path[:-1]
  return path


def path_name(path: KeyPath) -> str:
  """``block_0/dense/kernel`` for a key path; ``<root>`` for the empty path."""
  return jax.tree_util.keystr(_path_of(path), simple=True, separator="/") or "<root>"


def check_granularity(granularity: Granularity) -> None:
  if not callable(granularity) and granularity not in GRANULARITIES:
    raise ValueError(
      f"Unknown granularity {granularity!r}: expected one of {GRANULARITIES} "
      "or a callable params -> pytree of group labels."
    )


def leaf_groups(tree: Any, granularity: Granularity) -> tuple[tuple[str, ...], list[int]]:
  """Group names, in order of first appearance, and the group of every leaf."""
  check_granularity(granularity)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if granularity == "model":
    labels = ["model"] * len(paths)
  elif granularity == "layer":
    labels = [path_name(_path_of(path)[:-1]) for path in paths]
  elif granularity == "tensor":
    labels = [path_name(path) for path in paths]
  else:
    labels = [str(label) for label in _checks.group_labels(granularity, tree)]
  names = tuple(dict.fromkeys(labels))
  index = {name: position for position, name in enumerate(names)}
  return names, [index[label] for label in labels]


def group_names(params: Any, granularity: Granularity = "layer") -> tuple[str, ...]:
  """Names of the parameter groups, in the order of the state's groups axis.

  Args:
    params: the parameters (or any tree with the same paths, e.g. the stacked
      per-task gradients).
    granularity: ``"model"`` (one group), ``"layer"`` (leaves grouped by their
      parent path, e.g. a ``Dense`` layer's kernel and bias), ``"tensor"`` (one
      group per leaf) or a callable ``params -> pytree of labels`` (leaves with
      the same label share a group).

  Returns:
    One name per group, e.g. ``("encoder/dense_0", "encoder/dense_1", ...)``
    for ``granularity="layer"``: index ``k`` names ``state.targets[k]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ...           "head": {"kernel": jnp.ones((3, 1))}}
    >>> ogv.group_names(params, "layer")
    ('dense', 'head')
  """
  return leaf_groups(params, granularity)[0]


def check_task_axis(
  name: str, updates: Any, params: Any | None, num_tasks: int | None
) -> tuple[list[jax.Array], int]:
  """Checks stacked per-task gradients; returns their leaves and ``T``.

  Every leaf must be floating point and shaped ``[num_tasks, *param.shape]``.
  With ``num_tasks=None`` the leading axis of the first leaf sets it.
  """
  _checks.check_arrays(name, "gradient", updates)
  _checks.check_same_structure(name, updates, params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  param_shapes = [None] * len(flat)
  if params is not None:
    param_shapes = [tuple(jnp.shape(param)) for param in jax.tree.leaves(params)]
  for (path, leaf), param_shape in zip(flat, param_shapes, strict=True):
    shape = tuple(leaf.shape)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
        f"{name}: gradient leaf {path_name(path)!r} has dtype {leaf.dtype}; "
        "per-task gradients must be floating point."
      )
    if param_shape is not None and shape[1:] != param_shape:
      raise ValueError(
        f"{name}: gradient leaf {path_name(path)!r} has shape {shape} but its "
        f"parameter has shape {param_shape}; expected [num_tasks, *param.shape]. Was "
        f"the gradient already summed over tasks, or {name} not first in the chain?"
      )
    if num_tasks is None and shape:
      num_tasks = shape[0]
    if not shape or shape[0] != num_tasks:
      raise ValueError(
        f"{name}: gradient leaf {path_name(path)!r} has shape {shape}, expected a "
        f"leading task axis of size num_tasks={num_tasks}, i.e. [{num_tasks}, "
        "*param.shape]. Pass per-task gradients stacked on axis 0 (e.g. from "
        f"jax.vmap(jax.grad(loss))), and put {name} first in a chain."
      )
  return [leaf for _, leaf in flat], num_tasks if num_tasks is not None else 1


def _has_explicit_axes(leaf: jax.Array) -> bool:
  return bool(jax.typeof(leaf).sharding.mesh.explicit_axes)


def gram_matrices(
  leaves: Sequence[jax.Array], groups: Sequence[int], num_groups: int, dtype: jnp.dtype
) -> jax.Array:
  """``[num_groups, T, T]`` Gram matrices of the per-task gradients of each group.

  One contraction per leaf over all but the task axis, at HIGHEST precision
  (TPU's default f32 matmul is not exact) and accumulated in ``dtype``.
  """
  num_tasks = leaves[0].shape[0]
  grams = [jnp.zeros((num_tasks, num_tasks), dtype) for _ in range(num_groups)]
  for leaf, group in zip(leaves, groups, strict=True):
    if _has_explicit_axes(leaf):
      # A reshape cannot always express an Explicit sharding, so contract the
      # axes in place and name the (replicated) output sharding, as required
      # when the contracted axes are sharded.
      axes = tuple(range(1, leaf.ndim))
      out_sharding = PartitionSpec()
    else:
      # A [T, P] view: contracting several axes at once made XLA:CPU copy the
      # whole leaf into a transposed layout first (2-3x slower, and as much
      # temporary memory as the gradients).
      leaf = leaf.reshape(num_tasks, -1)
      axes, out_sharding = (1,), None
    grams[group] = grams[group] + jax.lax.dot_general(
      leaf,
      leaf,
      ((axes, axes), ((), ())),
      precision=_PRECISION,
      preferred_element_type=dtype,
      out_sharding=out_sharding,
    )
  return jnp.stack(grams)


def weighted_sum(leaf: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_t weights[t] * leaf[t]`` in ``weights``' dtype, returned in the leaf's.

  A contraction rather than ``(weights[:, None] * leaf).sum(0)``, which was many
  times slower on XLA:CPU.
  """
  total = jax.lax.dot_general(
    weights,
    leaf,
    (((0,), (0,)), ((), ())),
    precision=_PRECISION,
    preferred_element_type=weights.dtype,
  )
  return total.astype(leaf.dtype)


def compute_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """float32, or wider when some leaf is wider: similarity math never in bf16."""
  return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
