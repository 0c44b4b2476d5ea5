"""Tests of the multilingual example: data, analysis functions and one tiny end-to-end run."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("wordfreq")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")

import optax_gradvac as ogv
from optax_gradvac.examples import analysis, multilingual
from optax_gradvac.examples import data as data_lib
from optax_gradvac.examples import model as model_lib
from optax_gradvac.examples import train as train_lib


def _finite_numbers(tree):
  """Yields every number in a JSON tree (None marks an absent value and is skipped)."""
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _finite_numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _finite_numbers(value)
  elif isinstance(tree, int | float) and not isinstance(tree, bool):
    yield tree


def test_quick_run_writes_results_and_plots(tmp_path):
  """The command line, its runs side by side in two processes: the same numbers as one run
  in this process."""
  argv = [
    "--quick",
    *("--steps", "8", "--eval-every", "4", "--d-model", "16", "--batch-words", "4"),
    *("--languages", "es,pt,it,ru,uk,bg"),
    *("--methods", "sum,gradvac", "--granularity", "layer"),
    *("--pool-size", "2000", "--heldout-words", "40", "--low-resource-words", "60"),
    *("--out", str(tmp_path), "--no-progress", "--workers", "2"),
  ]
  returned = multilingual.main(argv)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results == json.loads(json.dumps(returned))
  experiment, _ = multilingual.parse_args(argv)
  method = experiment.methods[-1]
  alone = multilingual.train_run(multilingual.Run(experiment, method, seed=0))
  np.testing.assert_array_equal(results["heldout_bpc_per_seed"][method.name][0], alone.final_bpc)

  methods = ["sum", "gradvac"]
  assert results["methods"] == methods
  assert results["low_resource"] == ["pt", "uk"]
  for key in ("config", "heldout_bpc", "mean_bpc", "family_recovery", "curves", "seconds"):
    assert key in results
  for method in methods:
    assert set(results["heldout_bpc"][method]) == {"es", "pt", "it", "ru", "uk", "bg"}
    assert set(results["mean_bpc"][method]) == {"all", "low_resource", "others"}
    assert results["curves"][method]["eval_steps"] == [4, 8]
    per_seed = results["per_seed"][method]
    for subset, mean in results["mean_bpc"][method].items():
      assert np.mean(per_seed["final"][subset]) == pytest.approx(mean, rel=1e-6)
      assert per_seed["best"][subset][0] <= per_seed["final"][subset][0]
      assert per_seed["best_step"][subset][0] in (4, 8)
  assert set(results["family_recovery"]) == {"sum", "gradvac"}
  assert results["family_recovery"]["sum"]["matrix_kind"] == "cosine"
  for recovery in results["family_recovery"].values():
    assert -1 <= recovery["ari"] <= 1
  numbers = list(_finite_numbers(results))
  assert numbers and all(math.isfinite(x) for x in numbers)

  for name in ("curves", "similarity_sum", "similarity_gradvac"):
    png = tmp_path / f"{name}.png"
    assert png.stat().st_size > 1000
    assert results["plots"][name] == str(png)
  assert "| **mean, low-resource\\*** |" in (tmp_path / "results.md").read_text()
  assert "| method | all, final | all, best (step) |" in (tmp_path / "results.md").read_text()


def test_seed_scores_pick_each_subsets_best_evaluation():
  def history(bpc):
    bpc = np.asarray(bpc, float)
    return train_lib.History(
      train_loss=np.zeros((3, 3)),
      eval_steps=np.array([10, 20, 30]),
      heldout_bpc=bpc,
      targets=None,
      cosine=None,
      corrected_fraction=None,
      seconds=0.0,
    )

  low = np.array([True, False, False])
  # Rows: evaluations; columns: languages. The low-resource language is best at step 10,
  # the others at step 30.
  runs = [
    history([[4.0, 3.0, 3.2], [4.1, 2.9, 3.0], [4.3, 2.8, 2.8]]),
    history([[3.0, 2.0, 2.0], [3.5, 1.0, 1.0], [3.9, 1.5, 1.5]]),
  ]
  scores = multilingual.seed_scores(runs, low)
  assert scores["final"]["low_resource"] == pytest.approx([4.3, 3.9])
  assert scores["best"]["low_resource"] == pytest.approx([4.0, 3.0])
  assert scores["best_step"]["low_resource"] == [10, 10]
  assert scores["final"]["others"] == pytest.approx([2.8, 1.5])
  assert scores["best"]["others"] == pytest.approx([2.8, 1.0])
  assert scores["best_step"]["others"] == [30, 20]
  assert scores["best"]["all"] == pytest.approx([3.3, 5.5 / 3])
  assert scores["best_step"]["all"] == [30, 20]
  assert set(multilingual.seed_scores(runs, np.zeros(3, bool))["final"]) == {"all", "others"}


def _small_data(seed):
  return data_lib.make_data(
    ["es", "uk"],
    low_resource=["uk"],
    low_resource_words=50,
    heldout_words=60,
    pool_size=1500,
    seed=seed,
  )


def test_data_is_deterministic_and_heldout_words_are_unseen():
  first, again, other = _small_data(0), _small_data(0), _small_data(1)
  assert first.train_words == again.train_words
  assert first.heldout_words == again.heldout_words
  np.testing.assert_array_equal(first.train_tokens, again.train_tokens)
  np.testing.assert_array_equal(
    data_lib.sample_batches(first, 5, 4, seed=0), data_lib.sample_batches(again, 5, 4, seed=0)
  )
  assert first.heldout_words != other.heldout_words

  for train, heldout in zip(first.train_words, first.heldout_words, strict=True):
    assert len(heldout) == 60
    assert not set(train) & set(heldout)
  assert len(first.train_words[1]) == 50  # uk is low-resource
  assert len(first.train_words[0]) > 1000
  # A language's words do not depend on the other languages loaded.
  alone = data_lib.make_data(["es"], low_resource=[], heldout_words=60, pool_size=1500, seed=0)
  assert alone.heldout_words[0] == first.heldout_words[0]


def test_training_in_chunks_matches_training_step_by_step():
  data = _small_data(0)
  config = train_lib.TrainConfig(
    steps=7, batch_words=4, warmup_steps=2, d_model=16, num_layers=1, num_heads=2, eval_every=3
  )
  batches = data_lib.sample_batches(data, config.steps, config.batch_words, seed=0)

  def run(steps_per_call):
    surgery = ogv.gradvac(data.num_tasks, 0.1, key=0)
    return train_lib.train(
      surgery, data, config, batches=batches, progress=False, steps_per_call=steps_per_call
    )

  one, two = run(1), run(2)  # calls of 2 steps straddle the evaluations
  model = model_lib.CharTransformer(len(data.symbols), data.seq_len, 16, 1, 2)
  first_batch = data.train_tokens[np.arange(2)[:, None], batches[0]]
  first_losses = [
    model_lib.make_loss(model)(model_lib.init_params(model, data.seq_len, 0), tokens)
    for tokens in first_batch
  ]
  np.testing.assert_allclose(one.train_loss[0], first_losses, rtol=1e-5)
  np.testing.assert_array_equal(two.eval_steps, [3, 6, 7])
  for field in ("train_loss", "heldout_bpc", "targets", "cosine", "corrected_fraction"):
    np.testing.assert_allclose(getattr(two, field), getattr(one, field), rtol=1e-5, atol=1e-6)
  assert one.train_loss.shape == (7, 2) and one.heldout_bpc.shape == (3, 2)


def test_encoding_starts_with_the_language_tag_and_ends_the_word():
  symbols = data_lib.build_symbols(["es", "uk"])
  tokens = data_lib.encode_words(["sí"], "es", symbols, seq_len=5)
  assert [symbols[i] for i in tokens[0]] == ["<es>", "s", "í", data_lib.END_OF_WORD, data_lib.PAD]


def test_clean_words():
  words = ["Hola", "día", "x", "e-mail", "niño", "día", "москва"]
  assert data_lib.clean_words(words, data_lib.LANGUAGES["es"].letters, 2, 4) == [
    "hola",
    "día",
    "niño",
  ]


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--languages", "es,xx"], "unknown language code(s) xx; valid codes: es, pt"),
    (["--low-resource", "zz"], "unknown language code(s) zz; valid codes: es, pt"),
    (["--methods", "sum,adam"], "unknown method(s) adam; valid methods: sum, pcgrad, gradvac"),
    (["--granularity", "row"], "valid granularities: layer, model"),
  ],
)
def test_unknown_choices_are_clear_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as error:
    multilingual.main(argv)
  assert error.value.code == 2
  assert message in capsys.readouterr().err


def test_methods_and_seeds():
  names = [method.name for method in multilingual.resolve_methods(["sum", "gradvac"], "both")]
  assert names == ["sum", "gradvac-layer", "gradvac-model"]
  others = multilingual.resolve_methods(["mgda", "gradvac-model", "sum_low2"], "layer")
  assert [(m.name, m.kind, m.granularity) for m in others] == [
    ("mgda", "mgda", "model"),
    ("gradvac-model", "gradvac", "model"),
    ("sum_low2", "sum_low2", "model"),
  ]
  assert multilingual.parse_seeds("3", base=10) == (10, 11, 12)
  assert multilingual.parse_seeds("0,7", base=10) == (0, 7)


@pytest.mark.parametrize(
  ("labels_a", "labels_b", "expected"),
  [
    ([0, 0, 1, 1, 2], ["b", "b", "a", "a", "c"], 1.0),  # same partition, other names
    ([0, 0, 1, 2], [0, 0, 1, 1], 4 / 7),  # pairs: index 1, expected 1/3, max 3/2
    ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),  # pairs: index 0, expected 2/3, max 2
    ([0, 0, 0, 0], [0, 1, 2, 3], 0.0),
  ],
)
def test_adjusted_rand_index(labels_a, labels_b, expected):
  assert analysis.adjusted_rand_index(labels_a, labels_b) == pytest.approx(expected)


def test_family_recovery_of_a_block_matrix():
  families = ["A", "A", "B", "B", "C", "C"]
  same = np.equal.outer(families, families)
  similarity = np.where(same, 0.5, 0.1) + 0.01 * np.arange(36).reshape(6, 6) / 36
  recovery = analysis.family_recovery(similarity, list("uvwxyz"), families)
  assert recovery["ari"] == 1.0
  assert recovery["within_family"] == pytest.approx(0.5, abs=0.01)
  assert recovery["across_family"] == pytest.approx(0.1, abs=0.01)


def test_family_permutation_test_against_the_exact_count():
  """Two families of 4: 2 of the C(8, 4) = 70 labellings are as extreme as the truth."""
  families = ["a"] * 4 + ["b"] * 4
  same = np.equal.outer(families, families)
  related = np.where(same, 0.5, 0.1)
  p_value = analysis.family_permutation_test(related, families, num_permutations=20_000)
  assert p_value == pytest.approx(2 / 70, abs=0.004)
  # Families less similar inside than across: nothing to detect.
  assert analysis.family_permutation_test(-related, families, num_permutations=2_000) > 0.9
