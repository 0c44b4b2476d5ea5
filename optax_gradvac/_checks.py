"""Input checks: wherever two things must agree, say so at trace time, naming both.

Every check reads only static information (Python values, tree paths, shapes,
dtypes), never array values, so it costs nothing under ``jit`` and works on
tracers and ``jax.ShapeDtypeStruct`` alike. Each raises ``TypeError`` for a
wrong kind of thing and ``ValueError`` for a wrong value or shape, with a
message that starts with the public function's name and names the leaf path
and both shapes where there are two sides.
"""

import collections
import numbers
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence, Set
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

KeyPath = tuple[Any, ...]


def leaf_name(path: KeyPath) -> str:
  """``block_0/dense/kernel`` for a key path, as in :func:`optax_gradvac.group_names`.

  A trailing ``.value`` (an ``nnx.Param`` leaf at ``init``) is dropped, so the
  same parameter has the same name wherever it is seen.
  """
  if path and path[-1] == jax.tree_util.GetAttrKey("value"):
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _leaf_names(tree: Any) -> list[str]:
  return [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)


def _describe(value: Any) -> str:
  """``float32 array of shape (3,)`` for arrays, ``str '0.1'`` for the rest."""
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"{value.dtype} array of shape {tuple(value.shape)}"
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _dtype(value: Any) -> np.dtype:
  return value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype


def _is_key(value: Any) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _is_bool(value: Any) -> bool:
  return isinstance(value, bool | np.bool_)


# Configuration, checked when a transformation is built.


def check_size(name: str, arg: str, value: Any, minimum: int) -> None:
  """A static size (a Python or numpy integer, not a bool) of at least ``minimum``."""
  if not isinstance(value, numbers.Integral) or _is_bool(value):
    raise TypeError(
      f"{name}: {arg} must be a Python int, got {_describe(value)}. With "
      f"optax.inject_hyperparams, pass static_args=('{arg}',)."
    )
  if value < minimum:
    raise ValueError(f"{name}: {arg} must be at least {minimum}, got {value}.")


def check_num_tasks(name: str, num_tasks: Any) -> None:
  """``num_tasks`` sets array shapes, so it must be a static int of at least 1."""
  check_size(name, "num_tasks", num_tasks, 1)


def check_flag(name: str, arg: str, value: Any) -> None:
  """A Python ``if`` turns any object into a bool: ``shuffle="no"`` would mean yes."""
  if not _is_bool(value):
    raise TypeError(f"{name}: {arg} must be True or False, got {_describe(value)}.")


def _check_scalar(name: str, arg: str, value: Any) -> None:
  """A real number or a real scalar array (the form optax.inject_hyperparams passes)."""
  if _is_bool(value) or (getattr(value, "dtype", None) is not None and value.dtype == bool):
    raise TypeError(f"{name}: {arg} must be a number, got {_describe(value)}.")
  if isinstance(value, numbers.Real):
    return
  dtype = getattr(value, "dtype", None)
  if dtype is None or not hasattr(value, "shape"):
    hint = f" A schedule needs optax.inject_hyperparams(...)({arg}=schedule)." * callable(value)
    raise TypeError(
      f"{name}: {arg} must be a real number or a scalar array, got {_describe(value)}.{hint}"
    )
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{name}: {arg} must be real, got {_describe(value)}.")
  if tuple(value.shape):
    raise ValueError(f"{name}: {arg} must be a scalar, got {_describe(value)}.")


def check_rate(name: str, arg: str, value: Any) -> None:
  """A scalar in ``[0, 1]``; the range is checked only on Python numbers (arrays may be traced)."""
  _check_scalar(name, arg, value)
  if isinstance(value, numbers.Real) and not 0 <= value <= 1:
    raise ValueError(f"{name}: {arg} must be in [0, 1], got {value}.")


def check_positive(name: str, arg: str, value: Any) -> None:
  """A positive, finite scalar; the range is checked only on Python numbers."""
  _check_scalar(name, arg, value)
  if isinstance(value, numbers.Real) and not 0 < value < float("inf"):
    raise ValueError(f"{name}: {arg} must be positive and finite, got {value}.")


def check_nonnegative(name: str, arg: str, value: Any) -> None:
  """A non-negative, finite scalar; the range is checked only on Python numbers."""
  _check_scalar(name, arg, value)
  if isinstance(value, numbers.Real) and not 0 <= value < float("inf"):
    raise ValueError(f"{name}: {arg} must be non-negative and finite, got {value}.")


def check_transformation(name: str, tx: Any) -> None:
  """An object with ``init`` and ``update``, not the factory that builds one."""
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    hint = f" Call it first, e.g. {getattr(tx, '__name__', 'tx')}(...)." * callable(tx)
    raise TypeError(
      f"{name}: tx must be an optax.GradientTransformation, got {_describe(tx)}.{hint}"
    )


def check_every_k(name: str, every_k_schedule: Any) -> None:
  """optax.MultiSteps treats anything but a Python int as a schedule function."""
  if callable(every_k_schedule):
    return
  if not isinstance(every_k_schedule, int) or _is_bool(every_k_schedule):
    raise TypeError(
      f"{name}: every_k_schedule must be a Python int or a function of the step count, "
      f"got {_describe(every_k_schedule)}."
    )
  if every_k_schedule < 1:
    raise ValueError(f"{name}: every_k_schedule must be at least 1, got {every_k_schedule}.")


def check_float_dtype(name: str, arg: str, dtype: Any) -> None:
  """An accumulator in an integer dtype would silently truncate the gradients."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(f"{name}: {arg} must be a floating dtype, got {dtype!r}.") from error
  if not jnp.issubdtype(resolved, jnp.floating):
    raise TypeError(f"{name}: {arg} must be a floating dtype, got {resolved}.")


# Random keys.


def _raw_key_shape() -> tuple[int, ...]:
  """Shape of a raw key of the default PRNG implementation: (2,) for threefry."""
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def canonicalize_key(name: str, key: Any) -> jax.Array:
  """A typed PRNG key, in a buffer of its own, from any of the usual forms of a key.

  Accepts a typed key (``jax.random.key``), a legacy raw key
  (``jax.random.PRNGKey``: ``uint32`` of shape ``(2,)`` for the default
  implementation), or an integer seed (a Python int or an integer scalar
  array, possibly traced, as ``optax.inject_hyperparams`` passes it). A raw key
  and the seed it was made from give the same typed key. The result never
  shares its buffer with the input, so a state holding it can be donated
  without deleting the caller's key.
  """
  if _is_key(key):
    if _shape(key):
      raise ValueError(
        f"{name}: key must be a single key, got a key array of shape {_shape(key)} "
        "(e.g. from jax.random.split): pass one of them."
      )
    return jnp.copy(key)
  if _is_bool(key) or getattr(key, "dtype", None) == np.bool_:
    raise TypeError(f"{name}: key must be a PRNG key or an integer seed, got {_describe(key)}.")
  if isinstance(key, numbers.Integral):
    return jax.random.key(key)
  dtype, raw_shape = getattr(key, "dtype", None), _raw_key_shape()
  if dtype is not None and hasattr(key, "shape") and jnp.issubdtype(dtype, jnp.integer):
    if not _shape(key):
      return jax.random.key(key)
    if dtype == jnp.uint32 and _shape(key) == raw_shape:
      return jax.random.wrap_key_data(jnp.array(key, copy=True))
  raise TypeError(
    f"{name}: key must be a typed key (jax.random.key), a raw key (jax.random.PRNGKey: "
    f"uint32 of shape {raw_shape}) or an integer seed, got {_describe(key)}."
  )


def check_key(name: str, key: Any) -> None:
  """:func:`canonicalize_key`'s checks without computing anything, for construction time."""
  jax.eval_shape(lambda: canonicalize_key(name, key))


# Trees that must have the same paths.


def _holds_equinox_module(tree: Any) -> bool:
  """Whether ``tree`` is or contains an ``equinox.Module`` (without importing equinox)."""
  equinox = sys.modules.get("equinox")
  if equinox is None:
    return False
  is_module = lambda node: isinstance(node, equinox.Module)  # noqa: E731
  return any(is_module(node) for node in jax.tree.leaves(tree, is_leaf=is_module))


def check_arrays(name: str, what: str, tree: Any) -> None:
  """Every leaf has a shape and a dtype (an array, or a jax.ShapeDtypeStruct).

  An Equinox module holds functions and Python values beside its arrays: the
  message then says how to take its arrays apart.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      hint = ""
      if _holds_equinox_module(tree):
        hint = (
          " An Equinox module holds functions and Python values beside its arrays: pass "
          "its arrays, `params, static = eqx.partition(model, eqx.is_inexact_array)`, and "
          "rebuild the model in the loss with `eqx.combine(params, static)`; or take the "
          "per-task gradients with the filtered transforms, "
          "`eqx.filter_vmap(eqx.filter_value_and_grad(loss), in_axes=(None, 0, 0))`, and "
          "give the optimizer `eqx.filter(model, eqx.is_inexact_array)`."
        )
      raise TypeError(
        f"{name}: {what} leaf {leaf_name(path)!r} is not an array: got {_describe(leaf)}.{hint}"
      )


def check_same_structure(
  name: str, tree: Any, reference: Any, what: tuple[str, str] = ("gradients", "params")
) -> None:
  """``tree`` and ``reference`` have the same leaf paths, in the same order.

  Paths are compared by name (``dense/kernel``), so a dict and a FrozenDict, or
  an nnx ``State`` of ``Param`` and its pure arrays, count as the same tree.
  ``reference=None`` (no params given) checks nothing.
  """
  if reference is None:
    return
  names, reference_names = _leaf_names(tree), _leaf_names(reference)
  if names == reference_names:
    return
  known, reference_known = set(names), set(reference_names)
  extra = [leaf for leaf in names if leaf not in reference_known]
  missing = [leaf for leaf in reference_names if leaf not in known]
  details = []
  if extra:
    details.append(f"{what[0]} leaves {extra[:3]} are not in {what[1]}")
  if missing:
    details.append(f"{what[1]} leaves {missing[:3]} are not in {what[0]}")
  if not details:
    details.append("the same leaves in another order")
  raise ValueError(
    f"{name}: the {what[0]} ({len(names)} leaves) and {what[1]} ({len(reference_names)} "
    f"leaves) are different trees: {'; '.join(details)}. They must have the same paths."
  )


def group_labels(granularity: Callable[[Any], Any], tree: Any) -> list[Hashable]:
  """Calls a granularity callable; checks it returns one hashable label per leaf of ``tree``.

  The labels tree must have ``tree``'s paths (as for ``optax.partition``): a
  list of labels for a dict of parameters, a container in place of a label, or
  a ``None`` label would otherwise shift every label onto another leaf.
  """
  labels = granularity(tree)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  names, tree_names = [leaf_name(path) for path, _ in flat], _leaf_names(tree)
  if names != tree_names:
    known, tree_known = set(names), set(tree_names)
    extra = [label for label in names if label not in tree_known]
    missing = [leaf for leaf in tree_names if leaf not in known]
    raise ValueError(
      f"The granularity callable returned {len(names)} labels for a tree of "
      f"{len(tree_names)} leaves: it must return a tree with the same paths, one label "
      f"(e.g. a str) per leaf; no label for leaves {missing[:3]}, labels at paths "
      f"{extra[:3]} that the tree lacks (a list or None in place of a label shows up here)."
    )
  for path, label in flat:
    try:
      hash(label)
    except TypeError:
      raise TypeError(
        f"The granularity callable returned {_describe(label)} as the label of leaf "
        f"{leaf_name(path)!r}; labels must be hashable, e.g. str."
      ) from None
  return [label for _, label in flat]


# States that must match the transformation that uses them.


def check_state(name: str, state: Any, expected: Any) -> None:
  """A state of the transformation's own type, whose fields agree with ``expected``.

  ``expected`` is ``jax.eval_shape`` of the transformation's state for one group:
  every field must have its dtype kind and its shape but for the leading groups
  axis, and the fields must agree with each other on the number of groups. That
  number against the tree of gradients is the caller's to compare.
  """
  if type(state) is not type(expected):
    raise TypeError(
      f"{name}: expected its own state, a {type(expected).__name__}, got "
      f"{type(state).__name__}. Pass the state that this transformation's init returned "
      "(within a chain, let the chain pass it)."
    )
  grouped = [field for field in expected._fields if len(getattr(expected, field).shape) >= 2]
  for field in expected._fields:
    value, want = getattr(state, field), getattr(expected, field)
    shape = _shape(value)
    if _is_key(want):
      if not _is_key(value) or shape:
        raise TypeError(
          f"{name}: state.{field} is {_describe(value)}, expected a single typed PRNG key "
          "(a checkpoint written with flax.serialization stores raw key data: read it back "
          "with optax_gradvac.from_bytes)."
        )
      continue
    if not want.shape:
      integer = jnp.issubdtype(want.dtype, jnp.integer)
      if shape or not jnp.issubdtype(_dtype(value), jnp.integer if integer else want.dtype):
        kind = "an int" if integer else f"a {want.dtype}"
        raise TypeError(f"{name}: state.{field} is {_describe(value)}, expected {kind} scalar.")
      continue
    num_tasks = want.shape[-1]
    if len(shape) != len(want.shape) or shape[1:] != want.shape[1:]:
      built_for = (
        f" It was built for num_tasks={shape[-1]}."
        if len(shape) == len(want.shape) and shape[-1] != num_tasks
        else ""
      )
      task_axes = ", ".join(map(str, want.shape[1:]))
      raise ValueError(
        f"{name}: state.{field} has shape {shape} but this transformation has "
        f"num_tasks={num_tasks}: expected [num_groups, {task_axes}].{built_for} "
        "Pass the state built by the same transformation's init."
      )
    reference = getattr(state, grouped[0])
    if shape[0] != _shape(reference)[0]:
      raise ValueError(
        f"{name}: state.{field} has shape {shape} but state.{grouped[0]} has "
        f"{_shape(reference)}: the state's fields disagree on the number of groups."
      )
    for kind in (jnp.floating, jnp.integer, np.bool_):
      if jnp.issubdtype(want.dtype, kind) and not jnp.issubdtype(_dtype(value), kind):
        expected_kind = "floating" if kind is jnp.floating else np.dtype(want.dtype).name
        raise TypeError(
          f"{name}: state.{field} has dtype {_dtype(value)}, expected {expected_kind}."
        )


def check_reduction(name: str, reduction: Any) -> None:
  if reduction not in ("sum", "mean"):
    raise ValueError(f"{name}: reduction must be one of ('sum', 'mean'), got {reduction!r}.")


def check_accumulator(name: str, state: Any, updates: Any) -> None:
  """A MultiStepsState whose accumulator is shaped like the stacked gradients."""
  if not isinstance(state, optax.MultiStepsState):
    raise TypeError(
      f"{name}: expected an optax.MultiStepsState, got {type(state).__name__}. Pass the "
      "state that this transformation's init returned."
    )
  check_same_structure(name, updates, state.acc_grads, ("gradients", "state.acc_grads"))
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, update), accumulated in zip(flat, jax.tree.leaves(state.acc_grads), strict=True):
    if _shape(update) != _shape(accumulated):
      raise ValueError(
        f"{name}: state.acc_grads leaf {leaf_name(path)!r} has shape {_shape(accumulated)} "
        f"but its gradient has {_shape(update)}: the accumulator must be [num_tasks, "
        "*param.shape]. Build the state with this multi_steps(...).init, not "
        "optax.MultiSteps(...).init, and with the same num_tasks."
      )


def check_restorable(name: str, target: Any, saved: Any) -> None:
  """The saved state dict has the target's paths, shapes and dtypes.

  Both sides are flax state dicts (nested dicts of arrays): ``target`` from
  ``flax.serialization.to_state_dict``, ``saved`` from ``msgpack_restore``.
  flax checks the structure as it restores, but not shapes or dtypes. A typed
  key in the target is compared with the raw key data it was saved as.
  """
  expected = {
    leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  found = {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  if expected.keys() != found.keys():
    only_saved = [path for path in found if path not in expected]
    only_target = [path for path in expected if path not in found]
    raise ValueError(
      f"{name}: the bytes and the target are different trees: leaves {only_saved[:3]} are "
      f"only in the bytes, leaves {only_target[:3]} only in the target. Restore against "
      "the tree that was saved."
    )
  for path, leaf in expected.items():
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      continue
    if _is_key(leaf):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    value = np.asarray(found[path])
    if (value.shape, value.dtype) != (tuple(leaf.shape), np.dtype(leaf.dtype)):
      raise ValueError(
        f"{name}: leaf {path!r} is {value.dtype}{list(value.shape)} in the bytes but "
        f"{np.dtype(leaf.dtype)}{list(leaf.shape)} in the target. Restore against the tree "
        "that was saved (e.g. jax.eval_shape(tx.init, params) with the same transformation "
        "and parameters)."
      )


# Per-task losses.


def check_task_losses(name: str, losses: Any, num_tasks: int) -> None:
  """The ``losses=`` argument of ``update``: a float array ``[T]``, one loss per task."""
  if losses is None:
    raise ValueError(
      f"{name}: update needs the per-task losses: call tx.update(grads, state, params, "
      f"losses=losses) with losses of shape ({num_tasks},), e.g. the first output of "
      "ogv.task_value_and_grad (optax.chain and nnx.Optimizer.update pass it on)."
    )
  if not hasattr(losses, "shape") and not isinstance(losses, list | tuple):
    raise TypeError(
      f"{name}: losses must be an array of shape ({num_tasks},), got {_describe(losses)}."
    )
  if not jnp.issubdtype(_dtype(losses), jnp.floating):
    raise TypeError(f"{name}: losses is {_describe(losses)}; it must be a float array.")
  if _shape(losses) != (num_tasks,):
    raise ValueError(
      f"{name}: losses has shape {_shape(losses)} but num_tasks={num_tasks}: expected one "
      f"loss per task, shape ({num_tasks},)."
    )


def check_loss_output(name: str, output: Any, has_aux: bool) -> None:
  """A loss array, or a ``(loss, aux)`` pair with ``has_aux``."""
  pair = isinstance(output, tuple | list) and len(output) == 2
  if has_aux and not pair:
    raise TypeError(
      f"{name}: has_aux=True but loss_fn returned {_describe(output)}, not a (loss, aux) pair."
    )
  if not has_aux and isinstance(output, tuple | list):
    raise TypeError(
      f"{name}: loss_fn returned a {type(output).__name__} of {len(output)} items; return the "
      "loss alone, or a (loss, aux) pair with has_aux=True."
    )
  loss = output[0] if has_aux else output
  if not jnp.issubdtype(_dtype(loss), jnp.floating):
    raise TypeError(
      f"{name}: loss_fn returned {_describe(loss)} as the loss; it must be a float array."
    )


def scalar_loss(name: str, loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
  """``loss_fn``, checking that it returns a float scalar for one task's batch."""

  def checked(*args: Any) -> Any:
    output = loss_fn(*args)
    check_loss_output(name, output, has_aux)
    loss = output[0] if has_aux else output
    if _shape(loss):
      raise ValueError(
        f"{name}: loss_fn returned shape {_shape(loss)} for one task's batch; it must return "
        "a scalar, e.g. the mean over the task's examples."
      )
    return output

  return checked


def check_task_batches(name: str, task_batches: Sequence[Any]) -> None:
  """At least one batch leaf, and every batch leaf ``[T, ...]`` with the same ``T``."""
  flat = jax.tree_util.tree_flatten_with_path(tuple(task_batches))[0]
  if not flat:
    raise ValueError(
      f"{name}: no batch arrays; call f(params, *task_batches) with at least one [T, B, ...] array."
    )
  first_name, first_shape = None, None
  for path, leaf in flat:
    leaf_path, shape = f"task_batches{jax.tree_util.keystr(path)}", _shape(leaf)
    if not shape:
      raise ValueError(
        f"{name}: {leaf_path} has shape (), but every batch leaf needs a leading task axis "
        "[T, ...]; pass constants through params or a closure."
      )
    if first_shape is None:
      first_name, first_shape = leaf_path, shape
    elif shape[0] != first_shape[0]:
      raise ValueError(
        f"{name}: {leaf_path} has shape {shape} but {first_name} has {first_shape}: every "
        "batch leaf needs the same leading task axis T, [T, B, ...]."
      )


def check_batch_axis(name: str, batch_axis: Any) -> tuple[str, ...] | None:
  """``None``, a mesh axis name, or a non-empty sequence of distinct names (as a tuple)."""
  if batch_axis is None:
    return None
  axes = (batch_axis,) if isinstance(batch_axis, str) else batch_axis
  if (
    not isinstance(axes, tuple | list)
    or not axes
    or not all(isinstance(axis, str) for axis in axes)
  ):
    raise TypeError(
      f"{name}: batch_axis must be None, a mesh axis name or a sequence of them, got "
      f"{_describe(batch_axis)}."
    )
  if len(set(axes)) != len(axes):
    raise ValueError(f"{name}: batch_axis names a mesh axis twice: {tuple(axes)!r}.")
  return tuple(axes)


def check_batch_mesh(name: str, mesh: Any, axes: tuple[str, ...]) -> int:
  """The current mesh has every axis in ``axes``; returns the number of batch shards."""
  if mesh.empty:
    raise ValueError(
      f"{name}: batch_axis={axes!r} splits the batches over mesh axes, but no mesh is set; "
      "call it under `with jax.set_mesh(mesh):`, or leave batch_axis=None."
    )
  unknown = [axis for axis in axes if axis not in mesh.axis_names]
  if unknown:
    raise ValueError(
      f"{name}: batch_axis names {unknown!r}, not an axis of the current mesh, whose axes "
      f"are {tuple(mesh.axis_names)!r}."
    )
  shards = 1
  for axis in axes:
    shards *= mesh.shape[axis]
  return shards


def check_sharded_batches(
  name: str, task_batches: Sequence[Any], axes: tuple[str, ...], shards: int
) -> None:
  """Every batch leaf is ``[T, B, ...]`` with ``B`` a multiple of the number of shards."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tuple(task_batches))[0]:
    leaf_path, shape = f"task_batches{jax.tree_util.keystr(path)}", _shape(leaf)
    if len(shape) < 2:
      raise ValueError(
        f"{name}: {leaf_path} has shape {shape}, but with batch_axis every batch leaf needs "
        "a task axis and a batch axis, [T, B, ...]; pass constants through params or a closure."
      )
    if shape[1] % shards:
      raise ValueError(
        f"{name}: {leaf_path} has {shape[1]} examples per task (shape {shape}), which the "
        f"{shards} shards of mesh axes {axes!r} do not divide; every shard needs the same "
        "number of examples (pad the batch, or drop the remainder)."
      )


def check_task_grads_call(name: str, updates: Any, params: Any, task_grads_fn: Any) -> None:
  """The low-memory call ``update(None, state, params, task_grads_fn=fn)``."""
  if not callable(task_grads_fn):
    raise TypeError(
      f"{name}: task_grads_fn must be a function params -> (losses, per-task gradients), "
      f"got {_describe(task_grads_fn)}."
    )
  if jax.tree.leaves(updates):
    raise ValueError(
      f"{name}: got both gradients and task_grads_fn. With task_grads_fn the transformation "
      "computes the per-task gradients itself: call update(None, state, params, "
      "task_grads_fn=fn), or pass stacked gradients without task_grads_fn."
    )
  if params is None:
    raise ValueError(
      f"{name}: task_grads_fn needs the parameters: call update(None, state, params, "
      "task_grads_fn=fn)."
    )


def check_task_grads_output(name: str, output: Any) -> Any:
  """``task_grads_fn(params)`` returned ``(losses, grads)``; returns ``grads``."""
  if not (isinstance(output, tuple | list) and len(output) == 2):
    raise TypeError(
      f"{name}: task_grads_fn(params) returned {_describe(output)}; it must return "
      "(losses, per-task gradients) as ogv.task_value_and_grad and "
      "ogv.segment_value_and_grad do."
    )
  return output[1]


def check_task_ids(name: str, task_ids: Any) -> None:
  """An integer array ``[B]``: a float id would be truncated, a bool mask taken for ids 0/1."""
  dtype = getattr(task_ids, "dtype", None)
  if dtype is None or not hasattr(task_ids, "shape"):
    raise TypeError(
      f"{name}: task_ids must be an integer array [B], got {_describe(task_ids)}; "
      "wrap it with jnp.asarray."
    )
  if dtype == np.bool_:
    raise TypeError(
      f"{name}: task_ids is {_describe(task_ids)}, expected integer task ids in "
      "[0, num_tasks); was a mask passed? Give masked-out examples the id -1."
    )
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
      f"{name}: task_ids is {_describe(task_ids)}, expected integer task ids; "
      "cast it with .astype(jnp.int32)."
    )
  if len(_shape(task_ids)) != 1:
    raise ValueError(
      f"{name}: task_ids has shape {_shape(task_ids)}, expected one id per example, [B]."
    )


def check_example_losses(name: str, losses: Any, task_ids: Any) -> None:
  """One loss per example: shape ``[B]``, with ``B`` the number of task ids."""
  shape, expected = _shape(losses), _shape(task_ids)
  if shape == expected:
    return
  if not shape:
    hint = "return the per-example losses, not their mean"
  elif shape[:1] == expected and all(size == 1 for size in shape[1:]):
    hint = "squeeze the trailing axes"
  else:
    hint = "task_ids needs one id per example of the batch"
  raise ValueError(
    f"{name}: loss_fn returned losses of shape {shape} but task_ids has shape {expected}: "
    f"it must return one loss per example, shape {expected}; {hint}."
  )


# Names and arrays of the pure functions.


def check_task_names(name: str, task_names: Any) -> None:
  """An ordered collection of distinct hashable names: not a str (a sequence of letters)."""
  if (
    isinstance(task_names, str | bytes | Set | Mapping)
    or not hasattr(task_names, "__len__")
    or not hasattr(task_names, "__iter__")
  ):
    raise TypeError(
      f"{name}: task_names must be a list of names, one per task, got {_describe(task_names)}."
    )
  for task_name in task_names:
    if not isinstance(task_name, Hashable):
      raise TypeError(f"{name}: task name {task_name!r} is not hashable; use str names.")
  repeated = [item for item, count in collections.Counter(task_names).items() if count > 1]
  if repeated:
    raise ValueError(f"{name}: task_names repeats {repeated}; every task needs its own name.")


def check_gram(name: str, gram: jax.Array) -> None:
  """``[..., T, T]``: square in its last two axes."""
  shape = _shape(gram)
  if len(shape) < 2 or shape[-1] != shape[-2]:
    raise ValueError(
      f"{name}: gram has shape {shape}, expected [..., T, T] (square in its last two axes)."
    )


def check_surgery_inputs(name: str, gram: jax.Array, targets: jax.Array, order: jax.Array) -> None:
  """One group's ``[T, T]`` Gram matrix and targets and its ``[T, T - 1]`` integer order."""
  shape = _shape(gram)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(
      f"{name}: gram has shape {shape}, expected [T, T] for one parameter group "
      "(jax.vmap over groups)."
    )
  num_tasks = shape[0]
  if _shape(targets) != (num_tasks, num_tasks):
    raise ValueError(
      f"{name}: targets has shape {_shape(targets)} but gram has {shape}: expected "
      f"{(num_tasks, num_tasks)} for one parameter group."
    )
  if _shape(order) != (num_tasks, max(num_tasks - 1, 0)):
    raise ValueError(
      f"{name}: order has shape {_shape(order)} but gram has {shape}: expected "
      f"{(num_tasks, max(num_tasks - 1, 0))}, see visiting_order."
    )
  if not jnp.issubdtype(order.dtype, jnp.integer):
    raise TypeError(f"{name}: order has dtype {order.dtype}, expected integer task indices.")
