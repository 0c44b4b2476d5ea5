"""rlw's key handling and state; its weights against the same draws are checked in
test_gram_methods.py (the compact battery), over several steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gradvac as ogv

PARAMS = {"w": jnp.zeros(3)}


def test_seeds_typed_and_raw_keys_give_the_same_typed_key():
  keys = [
    ogv.rlw(2, key=key).init(PARAMS).key
    for key in (7, jax.random.key(7), jax.random.PRNGKey(7), jnp.asarray(7))
  ]
  for key in keys:
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(keys[0]))


def test_bad_keys_are_rejected():
  with pytest.raises(TypeError, match="rlw: key must be"):
    ogv.rlw(2, key=1.5)
  with pytest.raises(ValueError, match="rlw: key must be a single key"):
    ogv.rlw(2, key=jax.random.split(jax.random.key(0)))
