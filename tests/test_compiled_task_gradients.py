"""Every jitted per-task gradient path against each task's own ``jax.grad``, in float64.

The model is the reproducer of a miscompile: jaxlib 0.10.2's XLA:CPU (its YNNPACK
fusions, on AVX-512 machines) returned the per-task gradients of ``jit(vmap(vjp))``
over one-hot cotangents 20% off for this pre-LayerNorm attention block and tanh MLP,
with the losses right. The project excludes that jaxlib; this test runs on every jax
CI tests, so a release that miscompiles these paths fails it.

Tolerance: float32 gradients whose reductions are at most ``n = 1024`` terms long (the
tokens of the batch) are within about ``n * eps = 6e-5`` of the exact ones, relative,
in the worst case of accumulated rounding; the test allows ``1e-4``, three orders of
magnitude below the miscompile.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv
from optax_gradvac import _jaxlib, _pipeline

TASKS, EXAMPLES, POSITIONS, WIDTH = 4, 16, 16, 64  # examples per task
RTOL = 1e-4


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(variance + 1e-5) * scale + bias


def _block(params, x):
  """A pre-LayerNorm single-head attention sub-block, then a LayerNorm'd tanh MLP."""
  h = _layer_norm(x, params["ln_1"]["scale"], params["ln_1"]["bias"])
  q, k, v = (h @ params["attention"][name] for name in ("query", "key", "value"))
  attention = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(WIDTH), axis=-1)
  x = x + (attention @ v) @ params["attention"]["out"]
  h = _layer_norm(x, params["ln_2"]["scale"], params["ln_2"]["bias"])
  return x + jnp.tanh(h @ params["mlp"]["in"]) @ params["mlp"]["out"]


def _example_losses(params, x, y):
  return jnp.mean((_block(params, x) - y) ** 2, axis=(-2, -1))


def _mean_loss(params, x, y):
  return jnp.mean(_example_losses(params, x, y))


@functools.cache
def _problem():
  """Parameters, a mixed batch with interleaved task ids, and its task-separated layout."""
  rng = np.random.default_rng(0)

  def dense():
    return (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)

  def norm():
    return {"scale": np.ones(WIDTH, np.float32), "bias": np.zeros(WIDTH, np.float32)}

  params = {
    "ln_1": norm(),
    "attention": {name: dense() for name in ("query", "key", "value", "out")},
    "ln_2": norm(),
    "mlp": {"in": dense(), "out": dense()},
  }
  x, y = rng.standard_normal((2, TASKS * EXAMPLES, POSITIONS, WIDTH)).astype(np.float32)
  task_ids = np.tile(np.arange(TASKS), EXAMPLES)  # 0, 1, 2, 3, 0, 1, ...
  by_task = np.argsort(task_ids, kind="stable")
  separated = [a[by_task].reshape(TASKS, EXAMPLES, POSITIONS, WIDTH) for a in (x, y)]
  return params, task_ids, x, y, *separated


# conftest.py compiles the suite at XLA:CPU's lowest optimization; the miscompile is in
# the code users get, so these paths compile with XLA's defaults for the flags it set.
_XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def _jit(fn):
  """``jax.jit(fn)``, compiled with XLA's default options."""
  options = {
    name: value
    for name, value in _XLA_DEFAULTS.items()
    if f"--{name}=" in os.environ.get("XLA_FLAGS", "")
  }
  return lambda *args: jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


@functools.cache
def _expected_gradients():
  """``[T, ...]``: each task's gradient by its own float64 ``jax.grad``, no ``vmap``."""
  params, _, _, _, xs, ys = _problem()
  with enable_x64(True):
    to64 = functools.partial(jax.tree.map, lambda a: a.astype(np.float64))
    grad = jax.jit(jax.grad(_mean_loss))
    per_task = [grad(to64(params), to64(xs[t]), to64(ys[t])) for t in range(TASKS)]
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *per_task)


def _assert_each_task_close(actual, expected):
  for (path, got), want in zip(
    jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
  ):
    for task in range(TASKS):
      error = np.linalg.norm(np.asarray(got[task], np.float64) - want[task])
      relative = error / np.linalg.norm(want[task])
      name = jax.tree_util.keystr(path)
      assert relative < RTOL, f"task {task}, leaf {name}: relative error {relative:.3g}"


def test_segment_value_and_grad_jitted():
  params, task_ids, x, y, _, _ = _problem()
  _, grads = _jit(ogv.segment_value_and_grad(_example_losses, TASKS))(params, task_ids, x, y)
  _assert_each_task_close(grads, _expected_gradients())


def test_task_value_and_grad_jitted():
  params, _, _, _, xs, ys = _problem()
  _, grads = _jit(ogv.task_value_and_grad(_mean_loss))(params, xs, ys)
  _assert_each_task_close(grads, _expected_gradients())


@pytest.mark.parametrize("helper", ["segment", "task"])
def test_the_low_memory_path_jitted(helper):
  """Its update, with fixed task weights ``w``, against ``sum_t w_t g_t`` of the float64 gradients.

  Both passes (Gram matrices, then the weighted sum) compute the gradients; distinct
  weights tell the tasks apart. The error of the sum is at most ``sum_t w_t |e_t|``,
  so it is compared with ``RTOL * sum_t w_t |g_t|``.
  """
  params, task_ids, x, y, xs, ys = _problem()
  if helper == "segment":
    per_task = ogv.segment_value_and_grad(_example_losses, TASKS)
    task_grads_fn = lambda p: per_task(p, task_ids, x, y)  # noqa: E731
  else:
    task_grads_fn = lambda p: ogv.task_value_and_grad(_mean_loss)(p, xs, ys)  # noqa: E731
  weights = np.arange(1.0, TASKS + 1)
  method = _pipeline.stateless("fixed", lambda gram: jnp.asarray(weights, gram.dtype))
  tx = _pipeline.gram_transformation(method, TASKS, "layer")
  update, _ = _jit(
    lambda state, params: tx.update(None, state, params, task_grads_fn=task_grads_fn)
  )(tx.init(params), params)
  for (path, got), grads in zip(
    jax.tree_util.tree_flatten_with_path(update)[0],
    jax.tree.leaves(_expected_gradients()),
    strict=True,
  ):
    error = np.linalg.norm(np.asarray(got, np.float64) - np.tensordot(weights, grads, 1))
    scale = sum(w * np.linalg.norm(g) for w, g in zip(weights, grads, strict=True))
    assert error < RTOL * scale, f"{jax.tree_util.keystr(path)}: error {error / scale:.3g}"


@pytest.mark.parametrize(
  ("version", "xla_flags", "warns"),
  [
    ("0.10.2", "", True),
    ("0.10.2", "--xla_force_host_platform_device_count=8", True),
    ("0.10.2", "--xla_cpu_experimental_ynn_fusion_type=", False),
    ("0.10.1", "", False),
    ("0.11.2", "", False),
  ],
)
def test_importing_beside_the_miscompiling_jaxlib_warns(version, xla_flags, warns):
  message = _jaxlib.miscompile_warning(version, xla_flags)
  assert (message is not None) == warns
  if warns:
    assert "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=" in message
    assert f"pip install 'jaxlib!={version}'" in message
