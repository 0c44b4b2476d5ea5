"""The in-scan step (``ogv.tapped_value_and_grad``) on a mesh of 8 host devices.

Run by ``test_sharding_tap.py`` in a subprocess, because the device count must be
set before JAX starts. A scanned MLP (``[L, d, d]`` kernels), data parallel (the
batch axis split, parameters replicated) and FSDP (the kernels' last axis split,
each layer gathered in the scan body), Auto axes; the layers tapped by ``tap`` (the
body under ``jax.checkpoint``) or by ``tapped_vmap`` (no remat). For each it prints one
JSON object: the largest difference between the sharded in-scan step's update and
state and the same step on one device (float64), the per-device scratch of the
in-scan step and of the plain step (gradient of the summed loss, same layout), the
same at half the depth, the largest result of each collective in the in-scan step's
HLO, and the sizes.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import numpy as np

NUM_TASKS, NUM_LAYERS, WIDTH, BATCH = 8, 16, 64, 16
AXIS = "data"
LAYOUTS = [(layout, style) for style in ("tap", "tapped_vmap") for layout in ("data", "fsdp")]


def main() -> None:
  import jax

  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P
  from sharding import largest_collectives

  import optax_gradvac as ogv

  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  params = {
    "blocks": {
      "kernel": rng.normal(size=(NUM_LAYERS, WIDTH, WIDTH)) / np.sqrt(WIDTH),
      "bias": np.zeros((NUM_LAYERS, WIDTH)),
    }
  }
  xs = rng.normal(size=(NUM_TASKS, BATCH, WIDTH))
  ys = rng.normal(size=(NUM_TASKS, BATCH, WIDTH))
  tx = ogv.gradvac(NUM_TASKS, 0.3, granularity=ogv.StackedLayers("blocks"))
  mesh = jax.make_mesh((8,), (AXIS,), axis_types=(AxisType.Auto,))

  def make_losses(layout, style):
    # `tap` under jax.checkpoint, `tapped_vmap` without: each against the plain step with
    # the same remat policy.
    remat = jax.checkpoint if style == "tap" else lambda fn: fn

    def gathered(p):
      if layout == "fsdp":  # the layer's parameters whole, before use
        return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, P()), p)
      return p

    def layer(p, h):
      return jnp.tanh(h @ p["kernel"] + p["bias"])

    tapped_layer = ogv.tapped_vmap(layer)

    def losses(params, carriers, xs, ys):
      @remat
      def body(h, slices):
        layer_params, layer_carriers = slices
        # Gathered before the tap: the tap's [T, ...] copies are never gathered.
        if style == "tap":
          return jax.vmap(layer)(ogv.tap(gathered(layer_params), layer_carriers), h), None
        return tapped_layer(gathered(layer_params), layer_carriers, h), None

      h, _ = jax.lax.scan(body, xs, (params["blocks"], carriers["blocks"]))
      return jnp.mean((h - ys) ** 2, axis=(1, 2))

    def plain(params, xs, ys):
      def task_loss(x, y):
        body = remat(lambda p, h: layer(gathered(p), h))
        h, _ = jax.lax.scan(lambda h, p: (body(p, h), None), x, params["blocks"])
        return jnp.mean((h - y) ** 2)

      return jnp.sum(jax.vmap(task_loss)(xs, ys))

    return losses, plain

  def step(layout, style):
    losses, _ = make_losses(layout, style)
    return jax.jit(ogv.tapped_value_and_grad(losses, tx))

  def sharded_inputs(layout, depth):
    specs = {
      "kernel": P(None, None, AXIS) if layout == "fsdp" else P(),
      "bias": P(None, AXIS) if layout == "fsdp" else P(),
    }
    sharded = {
      "blocks": {
        name: jax.device_put(leaf[:depth], NamedSharding(mesh, specs[name]))
        for name, leaf in params["blocks"].items()
      }
    }
    batch = NamedSharding(mesh, P(None, AXIS))
    return sharded, [jax.device_put(array, batch) for array in (xs, ys)]

  def temps(layout, style, depth):
    """Per-device scratch bytes of the in-scan and the plain step with ``depth`` layers."""
    sharded, data = sharded_inputs(layout, depth)
    state = tx.init(sharded)
    _, plain = make_losses(layout, style)
    tapped = step(layout, style).lower(sharded, state, *data).compile()
    plain = jax.jit(jax.grad(plain)).lower(sharded, *data).compile()
    return tapped, plain.memory_analysis().temp_size_in_bytes

  state = tx.init(params)
  reference = step("data", "tap")(params, state, xs, ys)[1:]
  for layout, style in LAYOUTS:
    with jax.set_mesh(mesh):
      sharded, data = sharded_inputs(layout, NUM_LAYERS)
      got = step(layout, style)(sharded, state, *data)[1:]
      compiled, plain_temp = temps(layout, style, NUM_LAYERS)
      half, half_plain_temp = temps(layout, style, NUM_LAYERS // 2)

    def difference(a, b):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    worst = max(jax.tree.leaves(jax.tree.map(difference, got, reference)))
    report = {
      "layout": layout,
      "style": style,
      "difference": worst,
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "plain_temp_bytes": plain_temp,
      "half_depth_temp_bytes": half.memory_analysis().temp_size_in_bytes,
      "half_depth_plain_temp_bytes": half_plain_temp,
      **largest_collectives(compiled.as_text()),
      "num_tasks": NUM_TASKS,
      "num_layers": NUM_LAYERS,
      "largest_param": WIDTH * WIDTH,
      "num_params": NUM_LAYERS * (WIDTH * WIDTH + WIDTH),
      "itemsize": 8,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
