"""Pytree plumbing: parameter groups, input checks, Gram matrices, recombination.

The two functions that touch the gradients, :func:`scaled_gram_matrices` and
:func:`weighted_sum`, each read every gradient once; everything between them
acts on ``[num_groups, T, T]`` arrays.
"""

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from optax_gradvac import _checks

GRANULARITIES = ("model", "layer", "tensor")
_PRECISION = jax.lax.Precision.HIGHEST

KeyPath = tuple[Any, ...]
Group = int | tuple[int, ...]  # a leaf's group, or the group of each of its stacked layers


@dataclasses.dataclass(frozen=True, init=False)
class StackedLayers:
  """Per-layer groups for models whose layers are stacked on a leading axis.

  ``nn.scan``, ``nnx.scan`` or ``nnx.vmap`` over blocks put every block's parameters
  in one leaf (``blocks/mlp/kernel`` is ``[L, d, d]``), so path-based groups would
  merge the ``L`` layers into one. Under each prefix given here, every leaf carries
  the layers on its leading axis (after the task axis in the gradients), and slice
  ``l`` of each leaf belongs to the group of layer ``l``: ``blocks/mlp`` becomes
  ``blocks/0/mlp``, ``blocks/1/mlp``, ... The groups of a stack come in layer-major
  order, as the same model written with a Python loop over its blocks would give
  them. In the Gram form a stack's groups cost one batched contraction per leaf.
  A prefix whose subtree is a sequence of per-layer subtrees (``blocks/0/...``,
  ``blocks/1/...``: blocks written with a Python loop) is an error: ``"layer"``
  already gives each of them its own groups.

  Args:
    *prefixes: the paths of the stacked subtrees, as :func:`group_names` writes
      them (e.g. ``"blocks"`` or ``"encoder/layers"``).
    granularity: ``"layer"`` (default; leaves grouped by parent path within a
      layer, and elsewhere) or ``"tensor"`` (one group per leaf and layer).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> params = {"blocks": {"mlp": {"kernel": jnp.ones((3, 4, 4))}}, "head": {"w": jnp.ones(4)}}
    >>> ogv.group_names(params, ogv.StackedLayers("blocks"))
    ('blocks/0/mlp', 'blocks/1/mlp', 'blocks/2/mlp', 'head')
  """

  prefixes: tuple[str, ...]
  granularity: str

  def __init__(self, *prefixes: str, granularity: str = "layer") -> None:
    if not prefixes or not all(isinstance(prefix, str) and prefix for prefix in prefixes):
      raise ValueError(f"StackedLayers: expected one or more path prefixes, got {prefixes!r}.")
    if granularity not in ("layer", "tensor"):
      raise ValueError(
        f"StackedLayers: granularity must be 'layer' or 'tensor', got {granularity!r}."
      )
    object.__setattr__(self, "prefixes", tuple(prefix.strip("/") for prefix in prefixes))
    object.__setattr__(self, "granularity", granularity)


Granularity = str | Callable[[Any], Any] | StackedLayers


path_name = _checks.leaf_name


def check_granularity(granularity: Granularity) -> None:
  if isinstance(granularity, StackedLayers):
    return
  if not callable(granularity) and granularity not in GRANULARITIES:
    raise ValueError(
      f"Unknown granularity {granularity!r}: expected one of {GRANULARITIES}, "
      "an ogv.StackedLayers or a callable params -> pytree of group labels."
    )


# Haiku names the parameters created outside any module `~/name`: they lie at
# the top of the model, as an Equinox field or a linen `self.param` of the root.
_TOP_LEVEL_MODULES = ("", "~")


def _layer_of(name: str) -> str:
  """The ``"layer"`` group of the leaf named ``name``: the parent of its ``/``-separated name.

  The name joins the keys of the leaf's path, so a nested tree
  (``{"dense": {"kernel": ...}}``) and a flat dict keyed by paths
  (``{"dense/kernel": ...}``, as keras variable paths or Haiku module names
  give them) both make the group ``dense``. A leaf at the top of the tree (or
  in Haiku's top-level module ``~``) has no parent layer: it is a group of its
  own, named as the leaf.
  """
  parent = name.rpartition("/")[0]
  return name if parent in _TOP_LEVEL_MODULES else parent


def _labels(paths: Sequence[KeyPath], granularity: str) -> list[str]:
  if granularity == "model":
    return ["model"] * len(paths)
  if granularity == "layer":
    return [_layer_of(path_name(path)) for path in paths]
  return [path_name(path) for path in paths]


# More leaves than one layer usually holds (a kernel and a bias): one group for
# them under a granularity finer than "model" means the tree hides its layers.
_MANY_LEAVES = 3


def _warn_if_one_group(granularity: Granularity, names: Sequence[str], num_leaves: int) -> None:
  """Warns when a granularity finer than ``"model"`` finds one group for many leaves.

  Python shows a warning once per message and place (the default filter), so a
  model's warning appears once, at ``init`` or at the first trace of ``update``.
  """
  if callable(granularity) or granularity == "model" or len(names) != 1:
    return
  if num_leaves < _MANY_LEAVES:
    return
  warnings.warn(
    f"granularity {granularity!r} puts all {num_leaves} leaves in one group, "
    f"{names[0]!r}, as 'model' would: their paths share that parent. To group by "
    "layer, pass the tree whose top holds the layers (e.g. variables['params'], not "
    "variables), or a flat dict keyed by '/'-separated paths ({v.path: v.value} for "
    "keras variables), or label the leaves with a callable granularity; to mean one "
    "group, pass granularity='model'.",
    stacklevel=1,
  )


def _stack_of(name: str, prefixes: Sequence[str]) -> str | None:
  return next((p for p in prefixes if name == p or name.startswith(p + "/")), None)


def _check_not_unrolled(prefix: str, names: Sequence[str]) -> None:
  """Rejects a prefix whose subtree is a sequence of per-layer subtrees (``blocks/0/...``).

  Such a model is unrolled: every leaf is one layer's, and slicing its leading
  axis would make fake layers of its rows.
  """
  elements = []
  for name in names:
    head, _, rest = name[len(prefix) + 1 :].partition("/")
    if not (head.isdigit() and rest):
      return
    elements.append(f"{prefix}/{head}")
  elements = sorted(set(elements), key=lambda element: int(element.rpartition("/")[2]))
  shown = ", ".join(repr(element) for element in elements[:3]) + ", ..." * (len(elements) > 3)
  raise ValueError(
    f"StackedLayers: the subtree under {prefix!r} is a sequence of {len(elements)} "
    f"subtrees ({shown}): an unrolled model, one subtree per layer, whose leaves do not "
    "stack the layers on a leading axis. Use granularity='layer', which gives each of "
    "them its own groups. (If each of them does stack the layers, name them as prefixes: "
    f"StackedLayers({', '.join(repr(element) for element in elements[:2])}, ...).)"
  )


def _stacked_groups(
  flat: Sequence[tuple[KeyPath, Any]], spec: StackedLayers, layer_axis: int
) -> tuple[tuple[str, ...], list[Group]]:
  """Groups under :class:`StackedLayers`: one per (layer, group) inside a stack."""
  labels = _labels([path for path, _ in flat], spec.granularity)
  stacks = [_stack_of(path_name(path), spec.prefixes) for path, _ in flat]
  for prefix in spec.prefixes:
    if prefix not in stacks:
      raise ValueError(
        f"StackedLayers: no leaf lies under the prefix {prefix!r}; the paths are "
        f"{sorted({path_name(path) for path, _ in flat})}."
      )
    _check_not_unrolled(
      prefix,
      [path_name(path) for (path, _), stack in zip(flat, stacks, strict=True) if stack == prefix],
    )
  num_layers: dict[str, tuple[int, str]] = {}
  for (path, leaf), stack in zip(flat, stacks, strict=True):
    if stack is None:
      continue
    shape = tuple(jnp.shape(leaf))
    if len(shape) <= layer_axis:
      raise ValueError(
        f"StackedLayers: leaf {path_name(path)!r} under {stack!r} has shape {shape}: "
        "no stacked layer axis."
      )
    size, first = num_layers.setdefault(stack, (shape[layer_axis], path_name(path)))
    if shape[layer_axis] != size:
      raise ValueError(
        f"StackedLayers: leaf {path_name(path)!r} stacks {shape[layer_axis]} layers "
        f"(shape {shape}) but {first!r} under the same prefix {stack!r} stacks {size}."
      )

  def sliced(label: str, stack: str, layer: int) -> str:
    return f"{stack}/{layer}" + label[len(stack) :]

  ordered: list[str] = []
  for label, stack in zip(labels, stacks, strict=True):
    if stack is None:
      ordered.append(label)
    elif not any(name.startswith(stack + "/") for name in ordered):
      # The stack's first leaf: all of the stack's groups, layer-major.
      block = [other for other, where in zip(labels, stacks, strict=True) if where == stack]
      ordered += [
        sliced(other, stack, layer) for layer in range(num_layers[stack][0]) for other in block
      ]
  names = tuple(dict.fromkeys(ordered))
  index = {name: position for position, name in enumerate(names)}
  groups: list[Group] = [
    index[label]
    if stack is None
    else tuple(index[sliced(label, stack, layer)] for layer in range(num_layers[stack][0]))
    for label, stack in zip(labels, stacks, strict=True)
  ]
  return names, groups


def leaf_groups(
  tree: Any, granularity: Granularity, *, task_axis: bool = False
) -> tuple[tuple[str, ...], list[Group]]:
  """Group names, in order of first appearance, and the group of every leaf.

  ``task_axis`` says whether the leaves carry a leading task axis (the stacked
  gradients) or not (the parameters): stacked layers are on the next axis.
  """
  check_granularity(granularity)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if isinstance(granularity, StackedLayers):
    return _stacked_groups(flat, granularity, layer_axis=int(task_axis))
  paths = [path for path, _ in flat]
  if callable(granularity):
    labels = [str(label) for label in _checks.group_labels(granularity, tree)]
  else:
    labels = _labels(paths, granularity)
  names = tuple(dict.fromkeys(labels))
  _warn_if_one_group(granularity, names, len(labels))
  index = {name: position for position, name in enumerate(names)}
  return names, [index[label] for label in labels]


def group_names(params: Any, granularity: Granularity = "layer") -> tuple[str, ...]:
  """Names of the parameter groups, in the order of the state's groups axis.

  Args:
    params: the parameters (or any tree with the same paths, e.g. the stacked
      per-task gradients).
    granularity: ``"model"`` (one group), ``"layer"`` (leaves grouped by the
      parent of their ``/``-separated path, e.g. a ``Dense`` layer's kernel and
      bias, in a nested tree or a flat dict keyed by paths such as
      ``"dense/kernel"``; a leaf at the top of the tree is a group of its own),
      ``"tensor"`` (one group per leaf) or a callable ``params -> pytree of
      labels`` (leaves with the same label share a group).

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

    Keyed by paths (keras variables' ``v.path``), with a bare array on top:

    >>> flat = {"dense/kernel": jnp.ones((2, 3)), "dense/bias": jnp.ones(3),
    ...         "head/kernel": jnp.ones((3, 1)), "scale": jnp.ones(())}
    >>> ogv.group_names(flat, "layer")
    ('dense', 'head', 'scale')
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


def _may_be_sharded(leaf: jax.Array) -> bool:
  """Whether ``leaf`` may be split over devices: more than one device, or a mesh."""
  return jax.device_count() > 1 or not jax.typeof(leaf).sharding.mesh.empty


def _spread_task_axis(leaf: jax.Array) -> jax.Array:
  """``leaf``, moved from sharding its task axis to sharding a parameter axis.

  Under Explicit axes, a stacked gradient whose task axis is split over devices
  (task-sharded batches) would make the Gram contraction and the weighted sum
  gather the whole ``[T, ...]`` leaf on every device. Moving the task axis's
  mesh axes onto a parameter axis (one all-to-all) lets both contract their
  shards and reduce only ``[T, T]`` Gram matrices. The parameter axis is the
  last one that is not sharded yet and that the mesh axes divide; a leaf with
  none is left as it is.
  """
  if not _has_explicit_axes(leaf):
    return leaf
  sharding = jax.typeof(leaf).sharding
  spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
  if not spec or spec[0] is None:
    return leaf
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  size = 1
  for name in names:
    size *= sharding.mesh.shape[name]
  for axis in reversed(range(1, leaf.ndim)):
    if spec[axis] is None and leaf.shape[axis] % size == 0:
      moved = [None, *spec[1:]]
      moved[axis] = spec[0]
      return jax.sharding.reshard(leaf, PartitionSpec(*moved))
  return leaf


def _replicated(leaf: jax.Array) -> bool:
  """Whether ``leaf`` is known to be whole on every device (Explicit axes, no axis sharded)."""
  return _has_explicit_axes(leaf) and not any(jax.typeof(leaf).sharding.spec)


def _gram_view(leaf: jax.Array, stacked: bool) -> jax.Array:
  """The array the Gram contraction of ``leaf`` reads (the overflow rescue too).

  Sharded: the leaf (its task axis moved to a parameter axis under Explicit
  axes, :func:`_spread_task_axis`), contracted in place: a ``[T, -1]`` reshape of
  a leaf sharded on a non-leading axis makes XLA all-gather the whole stacked
  leaf on every device (Auto axes), and cannot always express an Explicit
  sharding. On one device, or replicated under Explicit axes: a ``[T, P]`` view
  (``[T, L, P]`` for ``stacked`` layers), since contracting several axes at once
  made XLA:CPU copy the whole leaf into a transposed layout first (2-3x slower,
  and as much temporary memory as the gradients); with replicated parameters the
  view is the row-major copy that the weighted sum reads too.
  """
  leaf = _spread_task_axis(leaf)
  if _may_be_sharded(leaf) and not _replicated(leaf):
    return leaf
  return leaf.reshape(*leaf.shape[: 1 + int(stacked)], -1)


def _leaf_gram(view: jax.Array, stacked: bool, dtype: jnp.dtype) -> jax.Array:
  """``[T, T]`` Gram matrix of a leaf's :func:`_gram_view` (``[L, T, T]`` if ``stacked``).

  Under Explicit axes the (replicated) output sharding is named, as required when
  the contracted axes are sharded.
  """
  batch = (1,) if stacked else ()
  axes = tuple(range(1 + len(batch), view.ndim))
  return jax.lax.dot_general(
    view,
    view,
    ((axes, axes), (batch, batch)),
    precision=_PRECISION,
    preferred_element_type=dtype,
    out_sharding=PartitionSpec() if _has_explicit_axes(view) else None,
  )


def _int_type(dtype: jnp.dtype) -> jnp.dtype:
  """The signed integer type of the same width as the floating ``dtype``."""
  return jnp.dtype(f"int{8 * jnp.dtype(dtype).itemsize}")


def _power_of_two(exponent: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``2**exponent`` in ``dtype``, exactly, for exponents of normal numbers.

  Written into the bits: ``jnp.ldexp`` handles every exponent but expands into
  some thirty operations per call, which XLA then compiles once per leaf.
  """
  info = jnp.finfo(dtype)
  biased = exponent.astype(_int_type(dtype)) + (info.maxexp - 1)
  return jax.lax.bitcast_convert_type(biased << info.nmant, dtype)


def _exponent(view: jax.Array, stacked: bool, dtype: jnp.dtype) -> jax.Array:
  """The power of two just above half the largest magnitude of ``view`` (0 if not usable).

  One per layer (``[L]``) for a :func:`_gram_view` of ``stacked`` layers, whose
  axis 1 is the layer axis: every layer is a group of its own, and one exponent
  for all of them would underflow the layers far smaller than the largest. Read
  from the bits of the largest magnitude (``frexp``'s exponent less one); zero,
  infinite, NaN and subnormal largest magnitudes are not usable (a subnormal one
  cannot overflow).
  """
  axes = tuple(axis for axis in range(view.ndim) if not (stacked and axis == 1))
  largest = jnp.max(jnp.abs(view), axis=axes).astype(dtype)
  info = jnp.finfo(dtype)
  bias = info.maxexp - 1
  biased = (jax.lax.bitcast_convert_type(largest, _int_type(dtype)) >> info.nmant) & (2 * bias + 1)
  usable = jnp.isfinite(largest) & (biased > 0)
  return jnp.where(usable, biased - bias, 0).astype(jnp.int32)


def _scaled_gram(
  leaf: jax.Array, exponent: jax.Array, stacked: bool, dtype: jnp.dtype
) -> jax.Array:
  """The Gram matrix of ``leaf`` divided by ``2**exponent`` (per layer if ``stacked``).

  Two factors of about ``2**(-exponent / 2)`` each: one factor ``2**-exponent``
  would be subnormal (zero on XLA:CPU) for the largest float32 exponent.
  """
  half = exponent >> 1
  factors = [_power_of_two(-part, dtype).astype(leaf.dtype) for part in (half, exponent - half)]
  if stacked:
    factors = [factor.reshape(1, -1, *[1] * (leaf.ndim - 2)) for factor in factors]
  return _leaf_gram(leaf * factors[0] * factors[1], stacked, dtype)


def _rescued_gram(leaf: jax.Array, stacked: bool, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """The Gram matrix of ``leaf`` divided by ``2**exponent``, and ``exponent``.

  ``2**exponent`` is the power of two just above half the largest magnitude (1
  for a zero leaf, or one with a NaN or inf entry: its Gram matrix stays
  non-finite).
  """
  exponent = _exponent(leaf, stacked, dtype)
  return _scaled_gram(leaf, exponent, stacked, dtype), exponent


# The gradients are split into at most about this many chunks: the groups whose
# weights are computed together (see stream_chunks), and on one device the leaves
# that share a conditional of the overflow rescue (see _rescue_chunks).
_CHUNKS = 16


def _nbytes(leaf: jax.Array) -> int:
  return leaf.size * leaf.dtype.itemsize


def chunk_limit(leaves: Sequence[jax.Array]) -> float:
  """Bytes of a chunk of leaves: the largest leaf's size or 1/16 of all, whichever is larger."""
  sizes = [_nbytes(leaf) for leaf in leaves]
  return max(*sizes, sum(sizes) / _CHUNKS)


def _packed(sizes: Sequence[int], limit: float) -> list[list[int]]:
  """Consecutive indices packed into lists whose sizes add up to at most ``limit``."""
  chunks: list[list[int]] = []
  total = 0
  for index, size in enumerate(sizes):
    if not chunks or total + size > limit:
      chunks.append([])
      total = 0
    chunks[-1].append(index)
    total += size
  return chunks


def _rescue_chunks(views: Sequence[jax.Array], limit: float) -> list[list[int]]:
  """The leaves of each ``lax.cond`` of the overflow rescue of stacked gradients.

  XLA copies a conditional's operands: one ``lax.cond`` reading every leaf made
  the update hold a second copy of all the stacked gradients (measured with
  ``memory_analysis``, 200 leaves: 1.0x their size). On a mesh, one conditional
  per leaf (there a conditional reading several leaves also made XLA keep them in
  its branch's layout). On one device, consecutive leaves share a conditional up
  to ``limit`` bytes (:func:`chunk_limit`): the copy stays within that, and a
  model with many small leaves does not pay one conditional per leaf, each of
  which costs XLA:GPU a read of its predicate by the host (one per leaf took an
  H100's update from 1.03 to 1.27 times its two passes, 50 leaves, T = 8).
  """
  if any(_may_be_sharded(view) for view in views):
    return [[index] for index in range(len(views))]
  return _packed([_nbytes(view) for view in views], limit)


# The least bytes of per-task gradients in a chunk of groups: below this, holding
# them costs less than compiling the method's solver once more.
_MIN_CHUNK_BYTES = 4 << 20


class Chunk(NamedTuple):
  """Groups ``start:stop`` and the indices of their leaves: weights computed together."""

  start: int
  stop: int
  leaves: list[int]


def stream_chunks(leaves: Sequence[jax.Array], groups: Sequence[Group]) -> list[Chunk]:
  """The chunks of groups whose weights are computed together, in group order.

  Each chunk's weights read its own leaves' Gram matrices only, so its update
  needs no other gradient: XLA then reduces each chunk's per-task gradients as
  soon as the backward pass has produced them, instead of holding them all until
  every Gram matrix exists. Groups that share a leaf (the layers of a stacked
  leaf) share a chunk; consecutive groups are packed into one chunk up to
  :func:`chunk_limit` of their leaves' bytes or 4 MiB (or their own, if larger),
  so that a model with many small groups does not compile its method's solver
  once per group, and a small model keeps one chunk.
  """
  num_groups = 1 + max(max(group) if isinstance(group, tuple) else group for group in groups)
  # Intervals of groups that share leaves, merged where they overlap.
  spans: list[list[int]] = []
  for start, stop in sorted(
    (min(group), max(group) + 1) if isinstance(group, tuple) else (group, group + 1)
    for group in groups
  ):
    if spans and start < spans[-1][1]:
      spans[-1][1] = max(spans[-1][1], stop)
    else:
      spans.append([start, stop])
  span_of = np.zeros(num_groups, int)
  for index, (start, stop) in enumerate(spans):
    span_of[start:stop] = index
  members: list[list[int]] = [[] for _ in spans]
  for index, group in enumerate(groups):
    members[span_of[min(group) if isinstance(group, tuple) else group]].append(index)
  sizes = [sum(_nbytes(leaves[index]) for index in member) for member in members]
  packed = _packed(sizes, max(*sizes, chunk_limit(leaves), _MIN_CHUNK_BYTES))
  return [
    Chunk(
      spans[chunk[0]][0],
      spans[chunk[-1]][1],
      sorted(index for span in chunk for index in members[span]),
    )
    for chunk in packed
  ]


def scaled_gram_matrices(
  leaves_after: Callable[[Any], Sequence[jax.Array]],
  groups: Sequence[Group],
  num_groups: int,
  dtype: jnp.dtype,
  *,
  recomputed: bool = False,
  model_leaves: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``[num_groups, T, T]`` Gram matrices of the gradients, divided by a power of two if need be.

  One contraction per leaf over all but the task axis (and the stacked-layer axis,
  for a leaf whose group is a tuple: a batched contraction, one Gram matrix per
  layer), at HIGHEST precision (TPU's default f32 matmul is not exact),
  accumulated in ``dtype`` and summed within each group.

  A finite gradient whose squared norm overflows ``dtype`` (entries around 1e19
  in float32) gives an infinite Gram diagonal. Each leaf's Gram matrices are
  checked: only a leaf whose diagonal exceeds ``sqrt(max) / number of leaves``
  or is not finite is read again
  (``lax.cond``: more passes over it in that rare case alone), divided by the
  power of two just above half its largest magnitude and contracted again. The
  leaves' Gram matrices are then brought to the largest of these powers within
  each group ``g``, ``scale[g]``, by powers of two, which is exact. The limit
  leaves room for the sums of the leaves and for the methods' own arithmetic
  (sums over tasks, products of two entries): with a float32 diagonal of 2e38,
  finite, every method's update was wrong.

  ``leaves_after(dependency)`` gives the gradient leaves, computed after
  ``dependency`` is known: the stacked gradients themselves, or (on the
  low-memory path, ``recomputed``) the gradients computed again, so that no
  pass needs all of them at once; ``model_leaves`` are all the model's leaves
  when ``leaves_after`` gives a chunk of them (:func:`stream_chunks`). Stacked
  gradients get a ``lax.cond`` per chunk of leaves (:func:`_rescue_chunks`).
  Recomputed gradients get one ``lax.cond`` whose branch computes them again.

  Returns:
    ``(gram, scale, finite)``: the Gram matrices of group ``g`` are those of its
    gradients divided by ``scale[g]`` (``[num_groups]`` powers of two in
    ``dtype``, 1 unless they overflowed); ``finite[g]`` says whether all of
    group ``g``'s gradient entries are finite (if not, the Gram matrices of its
    leaves with a NaN or inf entry are left out of ``gram[g]``).
  """
  stacked = [isinstance(group, tuple) for group in groups]

  def views_after(dependency: Any) -> list[jax.Array]:
    leaves = leaves_after(dependency)
    return [_gram_view(leaf, layers) for leaf, layers in zip(leaves, stacked, strict=True)]

  leaves = views_after(None)
  # The leaves of the whole model, when these are a chunk of them: the limits are theirs.
  model_leaves = leaves if model_leaves is None else model_leaves
  limit = np.sqrt(jnp.finfo(dtype).max) / len(model_leaves)
  zeros = [
    jnp.zeros(leaf.shape[1:2] if layers else (), jnp.int32)
    for leaf, layers in zip(leaves, stacked, strict=True)
  ]
  grams = [_leaf_gram(leaf, layers, dtype) for leaf, layers in zip(leaves, stacked, strict=True)]
  safe = [
    jnp.all(jnp.isfinite(diagonal) & (diagonal <= limit))
    for diagonal in (jnp.diagonal(gram, axis1=-2, axis2=-1) for gram in grams)
  ]
  exponents = list(zeros)
  if recomputed:

    def rescued() -> tuple[list[jax.Array], list[jax.Array]]:
      # Two passes, each computing the gradients again: the exponents, then the
      # scaled Gram matrices (as the stacked path's, leaf by leaf).
      found = [
        jnp.where(ok, zero, _exponent(leaf, layers, dtype))
        for ok, zero, leaf, layers in zip(safe, zeros, views_after(grams), stacked, strict=True)
      ]
      again = views_after(found)
      return [
        jnp.where(ok, gram, _scaled_gram(leaf, new, layers, dtype))
        for ok, gram, leaf, new, layers in zip(safe, grams, again, found, stacked, strict=True)
      ], found

    grams, exponents = jax.lax.cond(jnp.all(jnp.stack(safe)), lambda: (grams, exponents), rescued)
  else:
    for chunk in _rescue_chunks(leaves, chunk_limit(model_leaves)):

      def rescued(chunk: list[int] = chunk) -> tuple[list[jax.Array], list[jax.Array]]:
        # Only the leaves that overflowed take the rescaled Gram matrix.
        rescued_grams, rescued_exponents = [], []
        for index in chunk:
          gram, new = _rescued_gram(leaves[index], stacked[index], dtype)
          rescued_grams.append(jnp.where(safe[index], grams[index], gram))
          rescued_exponents.append(jnp.where(safe[index], zeros[index], new))
        return rescued_grams, rescued_exponents

      kept = ([grams[index] for index in chunk], [zeros[index] for index in chunk])
      chunk_grams, chunk_exponents = jax.lax.cond(
        jnp.all(jnp.stack([safe[index] for index in chunk])), lambda kept=kept: kept, rescued
      )
      for index, gram, new in zip(chunk, chunk_grams, chunk_exponents, strict=True):
        grams[index], exponents[index] = gram, new
  # One [T, T] block per leaf (per layer of a stacked leaf), with its exponent and group.
  blocks, block_exponents, members = [], [], []
  for gram, leaf_exponent, group in zip(grams, exponents, groups, strict=True):
    if isinstance(group, tuple):
      blocks += [gram[layer] for layer in range(len(group))]
      block_exponents += [leaf_exponent[layer] for layer in range(len(group))]
      members += group
    else:
      blocks.append(gram)
      block_exponents.append(leaf_exponent)
      members.append(group)
  membership = np.arange(num_groups)[:, None] == np.asarray(members)[None, :]  # [G, blocks]
  block_exponents = jnp.stack(block_exponents)
  # Each group at the largest power of its own leaves: one scale for all groups
  # would underflow the Gram matrices of a group far smaller than another.
  group_exponents = jnp.max(jnp.where(membership, block_exponents, 0), axis=1)
  shifts = 2 * (block_exponents - group_exponents[np.asarray(members)])
  factors = jnp.where(membership, jnp.ldexp(jnp.ones(shifts.shape, dtype), shifts), 0)
  # A NaN or inf entry makes its block non-finite (its task's squared norm is),
  # and its group's; zeroed, it cannot reach the other groups through the sums
  # (0 x NaN is NaN).
  blocks = jnp.stack(blocks)
  block_finite = jnp.all(jnp.isfinite(blocks), axis=(1, 2))
  finite = jnp.all(jnp.where(membership, block_finite, True), axis=1)
  blocks = jnp.where(block_finite[:, None, None], blocks, 0)
  # The group sums as one contraction, not a sum of the blocks: XLA fuses such a
  # sum into every reader of the Gram matrices, and compiles it once per reader
  # (at 48 leaves, a whole-model update compiled 3x slower).
  gram = jnp.einsum(
    "gb,btu->gtu", factors, blocks, precision=_PRECISION, preferred_element_type=dtype
  )
  return gram, jnp.ldexp(jnp.ones([], dtype), group_exponents), finite


def weighted_sum(leaf: jax.Array, weights: jax.Array, group: Group) -> jax.Array:
  """``sum_t weights[group, t] * leaf[t]`` in ``weights``' dtype, returned in the leaf's.

  ``weights`` is ``[num_groups, T]``. For a leaf of stacked layers (``group`` a
  tuple), slice ``l`` is weighted with its layer's group: a batched contraction.
  A contraction rather than ``(w[:, None] * leaf).sum(0)``, which was many times
  slower on XLA:CPU.
  """
  if isinstance(group, tuple):
    dimensions = (((1,), (0,)), ((0,), (1,)))  # [L, T] x [T, L, ...] -> [L, ...]
    weights = weights[jnp.asarray(group)]
  else:
    dimensions = (((0,), (0,)), ((), ()))
    weights = weights[group]
  spread = _spread_task_axis(leaf)
  total = jax.lax.dot_general(
    weights, spread, dimensions, precision=_PRECISION, preferred_element_type=weights.dtype
  )
  if spread is not leaf:  # back to the parameter's sharding
    total = jax.sharding.reshard(total, PartitionSpec(*jax.typeof(leaf).sharding.spec[1:]))
  return total.astype(leaf.dtype)


def compute_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """float32, or wider when some leaf is wider: similarity math never in bf16."""
  return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
