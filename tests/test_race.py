"""Tests of the method registry, the validation split and the tuning race of the example."""

import dataclasses
import json
import os

import numpy as np
import pytest

pytest.importorskip("wordfreq")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")

import jax
import jax.numpy as jnp
import optax

import optax_gradvac as ogv
from optax_gradvac.examples import data as data_lib
from optax_gradvac.examples import methods as methods_lib
from optax_gradvac.examples import multilingual, race
from optax_gradvac.examples import train as train_lib

TINY = multilingual.Experiment(
  languages=("es", "uk"),
  low_resource=("uk",),
  config=train_lib.TrainConfig(
    steps=3, batch_words=4, warmup_steps=1, d_model=16, num_layers=1, num_heads=2, eval_every=3
  ),
  low_resource_words=50,
  heldout_words=40,
  pool_size=1500,
)


def _setting(num_tasks=4):
  return methods_lib.Setting(
    num_tasks=num_tasks,
    granularity="model",
    beta=0.1,
    seed=0,
    low_resource=np.array([False, True, False, True])[:num_tasks],
    train_sizes=np.array([900, 50, 1600, 100])[:num_tasks],
  )


def test_every_registered_method_builds_and_steps():
  """Each entry gives a loss weighting or a transformation; the Gram ones are the library's.

  One jitted update each, beside the library's own transform (--methods NAME trains with
  ogv.NAME on the whole model).
  """
  rng = np.random.default_rng(0)
  params = {"w": np.zeros((3, 2), np.float32)}
  grads = {"w": rng.normal(size=(4, 3, 2)).astype(np.float32)}
  losses = jnp.asarray([1.0, 2.0, 0.5, 1.5])
  references = {
    "sum": ogv.sum_tasks(4),
    "mean": ogv.mean_tasks(4),
    "pcgrad": ogv.pcgrad(4, granularity="model", key=0),
    "gradvac": ogv.gradvac(4, 0.1, granularity="model", key=0),
  }
  for name, entry in methods_lib.REGISTRY.items():
    built = entry.build(_setting())
    if not isinstance(built, optax.GradientTransformation):
      state = built.init()
      total, weights = built.loss(losses, state, built.init_params())
      assert np.isfinite(total) and np.all(weights > 0), name
      built.update(losses, state)
      continue
    reference = references[name] if name in references else getattr(ogv, name)(4)
    extra = {"losses": losses} if entry.takes_losses else {}

    @jax.jit
    def both(grads, built=built, reference=reference, extra=extra):
      mine = built.update(grads, built.init(params), params, **extra)[0]
      return mine, reference.update(grads, reference.init(params), params, **extra)[0]

    mine, expected = both(grads)
    assert np.all(np.isfinite(mine["w"])), name
    np.testing.assert_allclose(mine["w"], expected["w"], rtol=1e-6, err_msg=name)


def test_static_weightings_of_the_sum():
  losses = jnp.asarray([1.0, 2.0, 3.0, 4.0])

  def weights(name):
    weighting = methods_lib.REGISTRY[name].build(_setting())
    # The weights are the gradient of the total with respect to the losses.
    return np.asarray(jax.grad(lambda x: weighting.loss(x, weighting.init())[0])(losses))

  np.testing.assert_allclose(weights("sum_low4"), np.array([1, 4, 1, 4]) / 2.5, rtol=1e-6)
  sizes = np.array([900, 50, 1600, 100]) ** (1 / 5)
  np.testing.assert_allclose(weights("temperature5"), sizes / sizes.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="low_resource: pass the data"):
    multilingual.make_surgery(multilingual.resolve_methods(["sum_low2"])[0], 4, beta=0.1, seed=0)


def test_a_new_method_is_one_entry(monkeypatch):
  """A Gram method that takes losses= and a loss weighting, registered and trained.

  Both weight the tasks by the softmax of their losses, so they must train alike: through
  the stacked task gradients and through one gradient of the weighted loss.
  """

  def softmax_of_losses(num_tasks):
    def update(updates, state, params=None, *, losses):
      del params
      weights = jax.nn.softmax(losses)
      return jax.tree.map(lambda g: jnp.einsum("t,t...->...", weights, g), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

  def softmax_weighting(num_tasks):
    def loss(losses, state, params=None):
      weights = jax.lax.stop_gradient(jax.nn.softmax(losses))
      return jnp.dot(weights, losses), weights

    def update(losses, state, *, losses_after_step=None):
      assert losses_after_step.shape == losses.shape == (num_tasks,)  # asked for below
      return state

    return train_lib.LossWeighting(lambda: (), lambda: None, loss, update)

  entries = {
    "softmax_gram": methods_lib.Entry(
      lambda s: softmax_of_losses(s.num_tasks), "softmax", takes_losses=True
    ),
    "softmax_loss": methods_lib.Entry(
      lambda s: softmax_weighting(s.num_tasks), "softmax", recompute_losses=True
    ),
  }
  for name, entry in entries.items():
    monkeypatch.setitem(methods_lib.REGISTRY, name, entry)
  histories = {
    name: multilingual.train_run(
      multilingual.Run(TINY, multilingual.resolve_methods([name])[0], 0, validation_words=30)
    )
    for name in entries
  }
  gram, loss = histories.values()
  np.testing.assert_allclose(gram.train_loss, loss.train_loss, rtol=1e-5)
  np.testing.assert_allclose(gram.heldout_bpc, loss.heldout_bpc, rtol=1e-5)
  np.testing.assert_allclose(gram.validation_bpc, loss.validation_bpc, rtol=1e-5)
  assert gram.validation_bpc.shape == gram.heldout_bpc.shape == (1, 2)


def test_validation_split_leaves_the_heldout_words_alone():
  def make(validation_words):
    return data_lib.make_data(
      ["es", "uk"],
      low_resource=["uk"],
      low_resource_words=50,
      heldout_words=60,
      validation_words=validation_words,
      pool_size=1500,
      seed=3,
    )

  plain, split = make(0), make(70)
  assert plain.validation_tokens is None and plain.validation_words == ()
  assert split.heldout_words == plain.heldout_words
  np.testing.assert_array_equal(split.heldout_tokens, plain.heldout_tokens)
  assert split.validation_tokens.shape == (2, 70, plain.seq_len)
  for train, heldout, validation in zip(
    split.train_words, split.heldout_words, split.validation_words, strict=True
  ):
    assert len(validation) == 70
    assert not set(validation) & set(heldout)
    assert not set(validation) & set(train)
  # es loses its validation words from training; uk (low-resource) keeps its 50 words
  # and its batches.
  assert set(split.train_words[0]) == set(plain.train_words[0]) - set(split.validation_words[0])
  assert split.train_words[1] == plain.train_words[1]
  batches = [data_lib.sample_batches(data, 5, 4, seed=3) for data in (plain, split)]
  np.testing.assert_array_equal(batches[0][:, 1], batches[1][:, 1])


def _fake_history(run):
  """Validation best at rate 3e-3 and for mgda; held-out best at 1e-2 and for pcgrad."""
  config = run.experiment.config
  rate, num_tasks = config.learning_rate, len(run.experiment.languages)
  evals = np.unique([*range(config.eval_every, config.steps, config.eval_every), config.steps])
  pcgrad = run.method.name == "pcgrad"
  validation = 3.0 + abs(np.log(rate / 3e-3)) + 0.01 * pcgrad
  heldout = 3.0 + abs(np.log(rate / 1e-2)) - 0.01 * pcgrad
  return train_lib.History(
    train_loss=np.zeros((config.steps, num_tasks)),
    eval_steps=evals,
    heldout_bpc=np.full((len(evals), num_tasks), heldout),
    targets=None,
    cosine=None,
    corrected_fraction=None,
    seconds=1.0,
    validation_bpc=np.full((len(evals), num_tasks), validation),
  )


def test_the_race_chooses_on_validation_and_resumes(tmp_path, monkeypatch):
  trained = []

  def fake_train_run(run, progress=False):
    trained.append((run.method.name, run.experiment.config.learning_rate, run.seed))
    return _fake_history(run)

  monkeypatch.setattr(multilingual, "train_run", fake_train_run)
  tiny = race.Race(
    sets=(race.LanguageSet("tiny", ("es", "uk"), ("uk",), (0, 1)),),
    methods=("sum", "pcgrad", "mgda"),
    always=("sum",),
    best=1,
    front=("sum_low2",),
    learning_rates=(1e-3, 3e-3, 1e-2),
    experiment=TINY,
  )
  results = race.run_race(tiny, str(tmp_path), stage="tune", progress=False)
  assert len(trained) == 9 and not results["final"]
  assert results["chosen"] == {"sum": 3e-3, "pcgrad": 3e-3, "mgda": 3e-3}

  results = race.run_race(tiny, str(tmp_path), progress=False)
  # Tuning runs are not run again; the final runs: the sum, the best other by validation
  # (mgda; pcgrad by held-out), the front, 2 seeds each.
  assert len(trained) == 9 + 6
  assert set(results["final"]["tiny"]) == {"sum", "mgda"}
  assert results["final"]["tiny"]["mgda"]["learning_rate"] == 3e-3
  assert set(results["front"]["tiny"]) == {"sum_low2"}
  assert results["front"]["tiny"]["sum_low2"]["difference_from_sum"]["all"] == {"0": 0, "1": 0}
  assert "**3.0000**" in (tmp_path / "race.md").read_text()
  assert json.loads((tmp_path / "race.json").read_text()) == json.loads(json.dumps(results))

  os.remove(race.RaceRun(tiny.sets[0], "mgda", 3e-3, 1).path(str(tmp_path)))
  race.run_race(tiny, str(tmp_path), progress=False)
  assert trained[15:] == [("mgda", 3e-3, 1)]

  with pytest.raises(ValueError, match=r"made with other settings \(config\)"):
    race.run_race(dataclasses.replace(tiny, tune_eval_every=1), str(tmp_path), progress=False)


def test_the_race_refuses_a_tuning_seed_among_the_final_seeds():
  with pytest.raises(ValueError, match="tuning seed 0 is also a seed"):
    race.Race(sets=(race.LANGUAGE_SETS["default"],), tune_seed=0)
  with pytest.raises(SystemExit):
    race.main(["--methods", "sum,adam", "--plan"])
