"""Multilingual character language modelling: plain sum vs PCGrad vs GradVac.

One task per language, all parameters shared. Every method trains from the same
initialisation on the same batches; the run reports held-out bits per character per
language, clusters the languages by their GradVac targets (and by the raw task-gradient
cosine under the plain sum) and checks the clusters against the language families.

Run ``python -m optax_gradvac.examples.multilingual --help`` for the options; ``--quick``
is a one-minute smoke test. The runs train side by side, one process per core
(``--workers``); the results do not depend on how many. From Python: build an
:class:`Experiment`, then :func:`run`, :func:`summarize` and :func:`write_outputs`, or call
:func:`main` with a list of flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import optax

from optax_gradvac.examples import analysis, parallel
from optax_gradvac.examples import data as data_lib
from optax_gradvac.examples import methods as methods_lib
from optax_gradvac.examples import train as train_lib


def method_names() -> tuple[str, ...]:
  """The valid ``--methods`` names: the registry's, and ``NAME-layer``, ``NAME-model`` for
  the methods that ``--granularity both`` runs twice."""
  names = []
  for name, entry in methods_lib.REGISTRY.items():
    names.append(name)
    if entry.per_granularity:
      names += [f"{name}-layer", f"{name}-model"]
  return tuple(names)


METHODS = method_names()
GRANULARITIES = ("layer", "model", "tensor", "both")
DEFAULT_METHODS = ("sum", "pcgrad", "gradvac")


@dataclasses.dataclass(frozen=True)
class Method:
  """A method of the comparison: a column of the table.

  Attributes:
    name: the column name, e.g. ``"gradvac-layer"``.
    kind: its entry in :data:`~optax_gradvac.examples.methods.REGISTRY`, e.g. ``"gradvac"``.
    granularity: the parameter groups of the surgery (for ``"sum"``: of the cosine probe).
  """

  name: str
  kind: str
  granularity: str


def resolve_methods(names: Sequence[str], granularity: str = "layer") -> tuple[Method, ...]:
  """Turns method names and ``--granularity`` into the methods to run.

  ``gradvac`` uses ``granularity``, or becomes ``gradvac-layer`` and ``gradvac-model``
  when it is ``"both"``; the sum's cosine probe uses it too (per layer for ``"both"``). PCGrad
  and the other methods work on the whole model, as in their papers.

  Args:
    names: names from :func:`method_names`.
    granularity: one of :data:`GRANULARITIES`.

  Returns:
    The methods, without repeats, in the given order.

  Raises:
    ValueError: for an unknown method or granularity; the message lists the valid ones.
  """
  valid = method_names()
  unknown = [name for name in names if name not in valid]
  if unknown:
    raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(valid)}")
  if granularity not in GRANULARITIES:
    raise ValueError(
      f"unknown granularity {granularity!r}; valid granularities: {', '.join(GRANULARITIES)}"
    )
  single = "layer" if granularity == "both" else granularity
  methods: dict[str, Method] = {}
  for name in names:
    kind, _, suffix = name.partition("-")
    entry = methods_lib.REGISTRY[kind]
    if suffix:
      found = [Method(name, kind, suffix)]
    elif entry.granularity is not None:
      found = [Method(name, kind, entry.granularity)]
    elif entry.per_granularity and granularity == "both":
      found = [Method(f"{name}-layer", kind, "layer"), Method(f"{name}-model", kind, "model")]
    else:
      found = [Method(name, kind, single)]
    for method in found:
      methods.setdefault(method.name, method)
  return tuple(methods.values())


def make_surgery(
  method: Method,
  num_tasks: int,
  *,
  beta: float,
  seed: int,
  data: data_lib.MultilingualData | None = None,
) -> optax.GradientTransformation | train_lib.LossWeighting:
  """What :func:`~optax_gradvac.examples.train.train` takes for ``method``.

  ``sum`` carries a GradVac probe whose update is discarded, so that its state records the
  cosine between the task gradients of a plain-sum run.

  Args:
    method: the method.
    num_tasks: the number of languages.
    beta: the EMA rate of the GradVac targets.
    seed: the seed of the random visiting orders.
    data: the data the run trains on; needed by the weightings that depend on it (which
      languages are low-resource, how many words each has).

  Returns:
    The transformation (to be followed by Adam), or the loss weighting.

  Raises:
    ValueError: if the method needs ``data`` and it is missing.
  """
  if data is None:
    low_resource = train_sizes = None
  else:
    low_resource = np.array([code in data.low_resource for code in data.languages])
    train_sizes = np.array([len(words) for words in data.train_words])
  setting = methods_lib.Setting(
    num_tasks=num_tasks,
    granularity=method.granularity,
    beta=beta,
    seed=seed,
    low_resource=low_resource,
    train_sizes=train_sizes,
  )
  return methods_lib.REGISTRY[method.kind].build(setting)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One comparison: languages, methods, seeds and training settings.

  Attributes:
    languages: the language codes, one task each.
    low_resource: the languages cut to ``low_resource_words`` training words.
    methods: the methods to compare.
    seeds: each seed draws its own data split, batches and initialisation; results are
      averaged over seeds.
    config: model size, optimiser and schedule.
    beta: the EMA rate of the GradVac targets (and of the probe under ``sum``).
    low_resource_words: training words per low-resource language.
    heldout_words: held-out words per language.
    pool_size: how many of each language's most frequent words are read.
  """

  languages: tuple[str, ...] = data_lib.DEFAULT_LANGUAGES
  low_resource: tuple[str, ...] = data_lib.DEFAULT_LOW_RESOURCE
  methods: tuple[Method, ...] = dataclasses.field(
    default_factory=lambda: resolve_methods(DEFAULT_METHODS)
  )
  seeds: tuple[int, ...] = (0,)
  config: train_lib.TrainConfig = dataclasses.field(default_factory=train_lib.TrainConfig)
  beta: float = 1e-2
  low_resource_words: int = 500
  heldout_words: int = 400
  pool_size: int = 20_000

  @property
  def families(self) -> tuple[str, ...]:
    """The family of each language."""
    return tuple(data_lib.LANGUAGES[code].family for code in self.languages)

  @property
  def low_resource_mask(self) -> np.ndarray:
    """bool ``[T]``: which languages are low-resource."""
    return np.array([code in self.low_resource for code in self.languages])


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a method on one seed's data and batches.

  Attributes:
    experiment: the comparison it belongs to (languages, data sizes, model, schedule).
    method: the method.
    seed: the seed of the data split, the batches, the initialisation and the method.
    validation_words: validation words per language (0: no validation split).
  """

  experiment: Experiment
  method: Method
  seed: int
  validation_words: int = 0


def _data_settings(run: Run) -> tuple:
  """What a run's data depends on: runs that agree on it share their data."""
  experiment = run.experiment
  return (
    experiment.languages,
    experiment.low_resource,
    experiment.low_resource_words,
    experiment.heldout_words,
    run.validation_words,
    experiment.pool_size,
    run.seed,
  )


@functools.lru_cache(maxsize=2)
def _data(settings: tuple) -> data_lib.MultilingualData:
  languages, low_resource, low_resource_words, heldout_words, validation_words, pool_size, seed = (
    settings
  )
  return data_lib.make_data(
    languages,
    low_resource=low_resource,
    low_resource_words=low_resource_words,
    heldout_words=heldout_words,
    validation_words=validation_words,
    pool_size=pool_size,
    seed=seed,
  )


@functools.lru_cache(maxsize=2)
def _batches(settings: tuple, steps: int, batch_words: int) -> np.ndarray:
  return data_lib.sample_batches(_data(settings), steps, batch_words, seed=settings[-1])


def train_run(run: Run, progress: bool = False) -> train_lib.History:
  """Trains one run; runs of the same seed share their data and batches.

  Args:
    run: what to train.
    progress: whether to show a progress bar (on the row of its worker process).

  Returns:
    Its history.
  """
  settings, config = _data_settings(run), run.experiment.config
  entry = methods_lib.REGISTRY[run.method.kind]
  data = _data(settings)
  surgery = make_surgery(
    run.method, data.num_tasks, beta=run.experiment.beta, seed=run.seed, data=data
  )
  return train_lib.train(
    surgery,
    data,
    config,
    seed=run.seed,
    batches=_batches(settings, config.steps, config.batch_words),
    description=f"{run.method.name} (seed {run.seed})",
    progress=progress,
    progress_row=parallel.worker_slot(),
    pass_losses=entry.takes_losses,
    recompute_losses=entry.recompute_losses,
  )


def _train_with_progress(run: Run) -> train_lib.History:
  return train_run(run, progress=True)


def run(
  experiment: Experiment, *, progress: bool = True, workers: int = 1
) -> dict[str, list[train_lib.History]]:
  """Trains every method on every seed.

  Every run of a seed starts from the same initialisation and sees the same batches; the
  results do not depend on ``workers``.

  Args:
    experiment: what to run.
    progress: whether to show progress bars.
    workers: how many runs train at once, each in its own process (1: one after another in
      this process).

  Returns:
    method name -> one :class:`~optax_gradvac.examples.train.History` per seed.
  """
  runs = [
    Run(experiment, method, seed) for seed in experiment.seeds for method in experiment.methods
  ]
  results = parallel.map_runs(
    _train_with_progress if progress else train_run, runs, workers=workers
  )
  histories: dict[str, list[train_lib.History]] = {method.name: [] for method in experiment.methods}
  for one_run, history in zip(runs, results, strict=True):
    histories[one_run.method.name].append(history)
  return histories


def similarity_matrices(
  experiment: Experiment, histories: dict[str, list[train_lib.History]]
) -> dict[str, tuple[str, np.ndarray]]:
  """The task-similarity matrix of each method that has one, averaged over seeds.

  Args:
    experiment: what was run.
    histories: from :func:`run`.

  Returns:
    method name -> ``(kind, [T, T] matrix)``: ``"targets"`` for GradVac (its EMA goals,
    averaged over parameter groups), ``"cosine"`` for the sum (the task-gradient cosine
    over the second half of training, averaged over parameter groups).
  """
  matrices = {}
  for method in experiment.methods:
    kind = methods_lib.REGISTRY[method.kind].similarity
    if kind is not None:
      runs = histories[method.name]
      matrices[method.name] = kind, np.mean([getattr(h, kind) for h in runs], axis=0)
  return matrices


def _mean_curves(histories: Sequence[train_lib.History]) -> dict[str, np.ndarray]:
  return {
    "train_loss": np.mean([h.train_loss for h in histories], axis=0),
    "eval_steps": histories[0].eval_steps,
    "heldout_bpc": np.mean([h.heldout_bpc for h in histories], axis=0),
  }


def _mean_or_none(values: np.ndarray) -> float | None:
  return float(values.mean()) if values.size else None


def seed_scores(histories: Sequence[train_lib.History], low: np.ndarray) -> dict:
  """Each seed's final and best-step held-out scores over the language subsets.

  The low-resource languages overfit (their held-out score is best well before the last
  step), so the best step is reported beside the final one. Best: the lowest mean over
  a subset's languages among the evaluations, and the step it was reached at.

  Args:
    histories: one run per seed.
    low: bool ``[T]``, the low-resource languages.

  Returns:
    ``{"final" | "best" | "best_step": {"all" | "low_resource" | "others": [per seed]}}``;
    a subset without languages is left out.
  """
  subsets = {"all": np.ones_like(low), "low_resource": low, "others": ~low}
  scores: dict = {"final": {}, "best": {}, "best_step": {}}
  for subset, mask in subsets.items():
    if not mask.any():
      continue
    curves = [h.heldout_bpc[:, mask].mean(axis=1) for h in histories]
    scores["final"][subset] = [float(curve[-1]) for curve in curves]
    scores["best"][subset] = [float(curve.min()) for curve in curves]
    scores["best_step"][subset] = [
      int(h.eval_steps[curve.argmin()]) for h, curve in zip(histories, curves, strict=True)
    ]
  return scores


def summarize(experiment: Experiment, histories: dict[str, list[train_lib.History]]) -> dict:
  """Collects every number of a run into a JSON-ready dict (the content of results.json).

  Args:
    experiment: what was run.
    histories: from :func:`run`.

  Returns:
    A dict with the settings (``config``, ``languages``, ``families``, ``low_resource``,
    ``seeds``, ``methods``), held-out bits per character (``heldout_bpc`` per method and
    language, averaged over seeds; ``heldout_bpc_per_seed``; ``mean_bpc`` over all, the
    low-resource and the other languages; ``per_seed``, each seed's final and best-step
    scores, see :func:`seed_scores`), ``family_recovery`` per similarity matrix (see
    :func:`~optax_gradvac.examples.analysis.family_recovery`), ``curves``,
    ``corrected_fraction`` (mean fraction of task pairs corrected per step) and ``seconds``.
  """
  languages, low = experiment.languages, experiment.low_resource_mask
  bpc = {name: np.mean([h.final_bpc for h in runs], axis=0) for name, runs in histories.items()}
  curves = {name: _mean_curves(runs) for name, runs in histories.items()}
  return {
    "config": {
      **dataclasses.asdict(experiment.config),
      "beta": experiment.beta,
      "low_resource_words": experiment.low_resource_words,
      "heldout_words": experiment.heldout_words,
      "pool_size": experiment.pool_size,
      "methods": [dataclasses.asdict(method) for method in experiment.methods],
    },
    "languages": list(languages),
    "families": list(experiment.families),
    "low_resource": list(experiment.low_resource),
    "seeds": list(experiment.seeds),
    "methods": list(histories),
    "heldout_bpc": {
      name: dict(zip(languages, map(float, values), strict=True)) for name, values in bpc.items()
    },
    "heldout_bpc_per_seed": {
      name: [h.final_bpc.tolist() for h in runs] for name, runs in histories.items()
    },
    "mean_bpc": {
      name: {
        "all": float(values.mean()),
        "low_resource": _mean_or_none(values[low]),
        "others": _mean_or_none(values[~low]),
      }
      for name, values in bpc.items()
    },
    "per_seed": {name: seed_scores(runs, low) for name, runs in histories.items()},
    "family_recovery": {
      name: {
        "matrix_kind": kind,
        **analysis.family_recovery(matrix, languages, experiment.families),
      }
      for name, (kind, matrix) in similarity_matrices(experiment, histories).items()
    },
    "curves": {
      name: {
        "eval_steps": curve["eval_steps"].tolist(),
        "heldout_bpc_all": curve["heldout_bpc"].mean(1).tolist(),
        "heldout_bpc_low_resource": (
          curve["heldout_bpc"][:, low].mean(1).tolist() if low.any() else None
        ),
        "train_bits_per_char": (curve["train_loss"].mean(1) / np.log(2)).tolist(),
      }
      for name, curve in curves.items()
    },
    "corrected_fraction": {
      name: float(np.mean([h.corrected_fraction.mean() for h in runs]))
      for name, runs in histories.items()
      if name != "sum" and runs[0].corrected_fraction is not None
    },
    "seconds": {name: float(sum(h.seconds for h in runs)) for name, runs in histories.items()},
  }


def _spread(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _seed_table(results: dict) -> list[str]:
  """Final and best-step means over the language subsets, mean ± sd over seeds."""
  names = {"all": "all", "low_resource": "low-resource", "others": "others"}
  subsets = [s for s in names if s in results["per_seed"][results["methods"][0]]["final"]]
  header = " | ".join(f"{names[s]}, final | {names[s]}, best (step)" for s in subsets)
  every = results["config"]["eval_every"]
  lines = [
    "## Final and best-step scores",
    "",
    "Mean held-out bits per character over each subset of languages, over "
    f"{len(results['seeds'])} seed(s): mean ± sd. Best: the lowest of the evaluations "
    f"(every {every} steps), with the median step it was reached at.",
    "",
    f"| method | {header} |",
    "|---|" + "---:|---:|" * len(subsets),
  ]
  for name in results["methods"]:
    scores = results["per_seed"][name]
    cells = [
      f"{_spread(scores['final'][s])} | {_spread(scores['best'][s])} "
      f"({int(np.median(scores['best_step'][s]))})"
      for s in subsets
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return [*lines, ""]


def report(results: dict) -> str:
  """The markdown summary of :func:`summarize`'s results: tables and wall time."""
  config = results["config"]
  low = ""
  if results["low_resource"]:
    low = f"* = low-resource ({config['low_resource_words']} training words); "
  lines = [
    "## Held-out bits per character (lower is better)",
    "",
    f"{len(results['languages'])} languages, {config['steps']} steps, seeds {results['seeds']}; "
    f"{low}bold = best of the row.",
    "",
    analysis.bpc_table(
      {name: list(values.values()) for name, values in results["heldout_bpc"].items()},
      results["languages"],
      results["families"],
      results["low_resource"],
    ),
    "",
    *_seed_table(results),
  ]
  if results["family_recovery"]:
    num_families = len(set(results["families"]))
    lines += [
      "## Do the similarities recover the language families?",
      "",
      f"| similarity | ARI, {num_families}-cluster cut | within family | across families "
      "| permutation p-value, within > across |",
      "|---|---:|---:|---:|---:|",
    ]
    for name, recovery in results["family_recovery"].items():
      lines.append(
        f"| {name} {recovery['matrix_kind']} | {recovery['ari']:.3f} | "
        f"{recovery['within_family']:.4f} | {recovery['across_family']:.4f} | "
        f"{recovery['permutation_p_value']:.4f} |"
      )
    lines.append("")
  seconds = ", ".join(f"{name} {value:.0f} s" for name, value in results["seconds"].items())
  total = results.get("total_seconds", sum(results["seconds"].values()))
  lines.append(f"Wall time: {total:.0f} s ({seconds}).")
  return "\n".join(lines)


def write_outputs(
  experiment: Experiment, histories: dict[str, list[train_lib.History]], results: dict, out: str
) -> None:
  """Writes the plots, ``results.json`` and ``results.md`` into ``out``.

  Adds the plot paths to ``results["plots"]`` before writing it.

  Args:
    experiment: what was run.
    histories: from :func:`run`.
    results: from :func:`summarize`.
    out: the output directory (created if needed).
  """
  os.makedirs(out, exist_ok=True)
  plots = {"curves": os.path.join(out, "curves.png")}
  analysis.plot_curves(
    {name: _mean_curves(runs) for name, runs in histories.items()},
    experiment.low_resource_mask,
    plots["curves"],
  )
  granularity = {method.name: method.granularity for method in experiment.methods}
  for name, (kind, matrix) in similarity_matrices(experiment, histories).items():
    what = "GradVac targets" if kind == "targets" else "task-gradient cosine"
    plots[f"similarity_{name}"] = os.path.join(out, f"similarity_{name}.png")
    analysis.plot_similarity(
      matrix,
      experiment.languages,
      experiment.families,
      f"{name}: {what} (mean over {granularity[name]} groups)",
      plots[f"similarity_{name}"],
    )
  results["plots"] = plots
  with open(os.path.join(out, "results.json"), "w") as file:
    json.dump(results, file, indent=1)
  with open(os.path.join(out, "results.md"), "w") as file:
    file.write(report(results) + "\n")


def _comma_list(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def parse_seeds(text: str, base: int = 0) -> tuple[int, ...]:
  """Parses ``--seeds``: a count ``N`` (seeds ``base .. base + N - 1``) or a comma list.

  Args:
    text: e.g. ``"3"`` or ``"0,7"``.
    base: the first seed of a count.

  Returns:
    The seeds.

  Raises:
    ValueError: if ``text`` is neither a positive count nor a list of integers.
  """
  items = _comma_list(text)
  if not items or not all(item.lstrip("-").isdigit() for item in items):
    raise ValueError(f"--seeds takes a count or a comma list of integers, got {text!r}")
  if len(items) == 1:
    count = int(items[0])
    if count < 1:
      raise ValueError(f"--seeds count must be positive, got {count}")
    return tuple(range(base, base + count))
  return tuple(int(item) for item in items)


# Settings that --quick shrinks (a one-minute smoke test); a flag given explicitly wins.
_DEFAULT = Experiment()
SIZES = {
  "steps": (_DEFAULT.config.steps, 200),
  "languages": (",".join(_DEFAULT.languages), "es,pt,de,da,ru,uk,pl,sk"),
  "batch_words": (_DEFAULT.config.batch_words, 16),
  "heldout_words": (_DEFAULT.heldout_words, 100),
  "pool_size": (_DEFAULT.pool_size, 4000),
  "d_model": (_DEFAULT.config.d_model, 64),
  "num_layers": (_DEFAULT.config.num_layers, 1),
  "num_heads": (_DEFAULT.config.num_heads, 2),
  "eval_every": (_DEFAULT.config.eval_every, 50),
}


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser."""
  parser = argparse.ArgumentParser(
    prog="python -m optax_gradvac.examples.multilingual", description=__doc__.split("\n\n")[0]
  )

  def sized(flag: str, kind: type, help_text: str) -> None:
    default, quick = SIZES[flag.removeprefix("--").replace("-", "_")]
    parser.add_argument(
      flag,
      type=kind,
      metavar="N" if kind is int else "LIST",
      help=f"{help_text} (default {default}; --quick: {quick})",
    )

  sized("--steps", int, "training steps per method")
  sized("--languages", str, f"comma list of language codes from {', '.join(data_lib.LANGUAGES)}")
  parser.add_argument(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    help=f"comma list from {', '.join(METHODS)} (default %(default)s; "
    "see optax_gradvac.examples.methods)",
  )
  parser.add_argument(
    "--granularity",
    default="layer",
    help=f"GradVac parameter groups: {', '.join(GRANULARITIES)} (default %(default)s; "
    "'both' runs gradvac-layer and gradvac-model)",
  )
  parser.add_argument(
    "--beta",
    type=float,
    default=_DEFAULT.beta,
    help="EMA rate of the GradVac targets (default %(default)s)",
  )
  parser.add_argument(
    "--seeds",
    default="1",
    help="a count, or a comma list of seeds; results are averaged (default %(default)s)",
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="the first seed when --seeds is a count (default 0)"
  )
  parser.add_argument(
    "--low-resource",
    help="comma list of low-resource languages, or 'none' (default: those of "
    f"{','.join(data_lib.DEFAULT_LOW_RESOURCE)} among --languages)",
  )
  parser.add_argument(
    "--low-resource-words",
    type=int,
    default=_DEFAULT.low_resource_words,
    help="training words per low-resource language (default %(default)s)",
  )
  sized("--heldout-words", int, "held-out words per language")
  sized("--pool-size", int, "most frequent words read per language")
  sized("--batch-words", int, "words per language per step")
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=_DEFAULT.config.learning_rate,
    help="Adam's peak learning rate (default %(default)s)",
  )
  sized("--d-model", int, "model width")
  sized("--num-layers", int, "transformer blocks")
  sized("--num-heads", int, "attention heads")
  sized("--eval-every", int, "held-out evaluation period in steps")
  parser.add_argument(
    "--out",
    default=os.path.join("runs", "multilingual"),
    help="output directory (default %(default)s)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="a one-minute smoke test: small model, 8 languages"
  )
  parser.add_argument(
    "--workers",
    type=int,
    help="runs trained at once, each in its own process; the results do not depend on it "
    "(default: one per core, or one per run when there are at most 1.5 runs per core)",
  )
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Experiment, argparse.Namespace]:
  """Parses command-line flags into an :class:`Experiment`.

  Args:
    argv: the flags (``sys.argv[1:]`` when None).

  Returns:
    The experiment and the parsed flags (for ``out``, ``workers`` and ``no_progress``).

  Raises:
    SystemExit: with a usage message, for an unknown language, method or granularity, or
      an invalid ``--seeds``, ``--low-resource`` or ``--workers``.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  for name, (default, quick) in SIZES.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else default)
  try:
    languages = data_lib.check_languages(_comma_list(args.languages))
    if args.low_resource is None:
      low_resource = tuple(code for code in data_lib.DEFAULT_LOW_RESOURCE if code in languages)
    elif args.low_resource.strip().lower() == "none":
      low_resource = ()
    else:
      low_resource = data_lib.check_languages(_comma_list(args.low_resource))
    missing = [code for code in low_resource if code not in languages]
    if missing:
      raise ValueError(f"low-resource language(s) {', '.join(missing)} not in --languages")
    if args.workers is not None and args.workers < 1:
      raise ValueError(f"--workers must be positive, got {args.workers}")
    if len(languages) < 2:
      raise ValueError("--languages needs at least two languages (one task each)")
    experiment = Experiment(
      languages=languages,
      low_resource=low_resource,
      methods=resolve_methods(_comma_list(args.methods), args.granularity),
      seeds=parse_seeds(args.seeds, args.seed),
      config=train_lib.TrainConfig(
        steps=args.steps,
        batch_words=args.batch_words,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.steps // 20),
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        eval_every=args.eval_every,
      ),
      beta=args.beta,
      low_resource_words=args.low_resource_words,
      heldout_words=args.heldout_words,
      pool_size=args.pool_size,
    )
  except ValueError as error:
    parser.error(str(error))
  return experiment, args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparison, prints the tables and writes everything to ``--out``.

  Args:
    argv: command-line flags (``sys.argv[1:]`` when None).

  Returns:
    The content of ``results.json``.
  """
  experiment, args = parse_args(argv)
  workers = args.workers or parallel.default_workers(
    len(experiment.seeds) * len(experiment.methods)
  )
  start = time.perf_counter()
  histories = run(experiment, progress=not args.no_progress, workers=workers)
  results = summarize(experiment, histories)
  results["total_seconds"] = time.perf_counter() - start
  write_outputs(experiment, histories, results, args.out)
  print("\n" + report(results) + f"\n\nWritten to {args.out}/.")
  return results


if __name__ == "__main__":
  main()
