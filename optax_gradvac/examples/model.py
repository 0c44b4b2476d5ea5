"""A small character-level transformer language model over single words.

The model reads ``[<lang>, c_1, ..., c_n]`` and predicts ``[c_1, ..., c_n, <eow>]``: the
language tag is the only thing that tells the languages apart, and every parameter is
shared by all of them. Token 0 is padding and is never predicted.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Block(nn.Module):
  """A pre-norm transformer block: causal self-attention, then a two-layer MLP."""

  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``x`` of shape ``[..., length, d_model]`` to the same shape."""
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], dtype=bool))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
      nn.LayerNorm(name="attention_norm")(x), mask=mask
    )
    hidden = nn.Dense(self.mlp_ratio * x.shape[-1], name="mlp_in")(nn.LayerNorm(name="mlp_norm")(x))
    return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(hidden))


class CharTransformer(nn.Module):
  """A causal character-level transformer with learned position embeddings.

  Attributes:
    vocab_size: the number of token ids.
    max_length: the longest input sequence.
    d_model: the width of the residual stream.
    num_layers: the number of transformer blocks.
    num_heads: the number of attention heads.
  """

  vocab_size: int
  max_length: int
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``[..., length]`` to next-token logits ``[..., length, vocab_size]``."""
    x = nn.Embed(self.vocab_size, self.d_model, name="embed")(tokens)
    positions = self.param(
      "position", nn.initializers.normal(0.02), (self.max_length, self.d_model)
    )
    x = x + positions[: tokens.shape[-1]]
    for layer in range(self.num_layers):
      x = Block(self.num_heads, name=f"block_{layer}")(x)
    return nn.Dense(self.vocab_size, name="readout")(nn.LayerNorm(name="final_norm")(x))


def init_params(model: CharTransformer, seq_len: int, seed: int) -> dict:
  """Initialises the parameters of ``model`` for encoded words of length ``seq_len``.

  Args:
    model: the model.
    seq_len: the encoded word length (the model reads ``seq_len - 1`` tokens).
    seed: the random seed.

  Returns:
    The parameter pytree (the ``"params"`` collection).
  """
  tokens = jnp.zeros((1, seq_len - 1), dtype=jnp.int32)
  return model.init(jax.random.key(seed), tokens)["params"]


def word_nats(
  model: CharTransformer, params: dict, tokens: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The summed negative log-likelihood (nats) of encoded words, and how many tokens it covers.

  Args:
    model: the model.
    params: its parameters.
    tokens: encoded words, int ``[..., seq_len]``.

  Returns:
    ``(nats, count)``, each of shape ``tokens.shape[:-1]``: per word, the total nats of its
    letters and end-of-word token, and their number.
  """
  logits = model.apply({"params": params}, tokens[..., :-1])
  targets = tokens[..., 1:]
  mask = targets != 0
  nats = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return (nats * mask).sum(-1), mask.sum(-1)


def make_loss(model: CharTransformer) -> Callable[[dict, jax.Array], jax.Array]:
  """Returns ``loss(params, tokens)``: mean nats per predicted token over a batch of words.

  Args:
    model: the model.

  Returns:
    The loss function of one task's batch ``tokens`` (int ``[batch, seq_len]``).
  """

  def loss(params: dict, tokens: jax.Array) -> jax.Array:
    nats, count = word_nats(model, params, tokens)
    return nats.sum() / count.sum()

  return loss


def bits_per_character(
  model: CharTransformer, params: dict, tokens: jax.Array | np.ndarray
) -> jax.Array:
  """Held-out bits per character of each language.

  The end-of-word token counts as a character, so a word of ``n`` letters is ``n + 1``
  predictions. All-padding rows contribute nothing.

  Args:
    model: the model.
    params: its parameters.
    tokens: encoded words, int ``[T, num_words, seq_len]``.

  Returns:
    float32 ``[T]``: total bits over total predicted tokens, per language.
  """
  nats, count = word_nats(model, params, jnp.asarray(tokens))
  return nats.sum(-1) / count.sum(-1) / jnp.log(2.0)
