"""A fair race of the multi-task methods: learning rates tuned on validation words.

The multilingual experiment's main job trains every method at one learning rate. Here each
method gets its own, chosen the same way for all of them, the plain sum included:

1. **Tuning.** Every method of ``--methods`` trains on the first language set, on one seed
   (``--tune-seed``), once per learning rate of one grid (``--learning-rates``: 5 rates a
   factor 2 apart around the main job's 3e-3). Its rate is the one with the lowest mean
   validation bits per character over all languages after the last step. Validation words
   are drawn from each language's pool apart from the held-out words (see
   :func:`~optax_gradvac.examples.data.make_data`); nothing here looks at the held-out
   words to choose.
2. **Final runs.** The sum, PCGrad, GradVac (``--always``) and the ``--best`` best other
   methods by their tuned validation score train at their chosen rates on every seed of
   every language set; they are scored on the held-out words.
3. **The sum's front.** Static weightings of the sum (``--front``: low-resource languages
   weighted 2, 4 or 8 times; temperature-based sampling of languages in expectation) train
   at the sum's chosen rate on the seeds of the first set.

Every run is saved to its own JSON file under ``OUT/runs/`` when it ends, and a run whose
file exists is not run again: an interrupted race resumes where it stopped, across sessions
if ``OUT`` is kept. ``OUT/race.md`` and ``OUT/race.json`` hold the tables. The runs train side
by side, one process per core (``--workers``). ``--plan`` prints what is left and its cost.

Run ``python -m optax_gradvac.examples.race --help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from collections.abc import Iterable, Sequence

import numpy as np

from optax_gradvac.examples import data as data_lib
from optax_gradvac.examples import methods as methods_lib
from optax_gradvac.examples import multilingual, parallel
from optax_gradvac.examples import train as train_lib


@dataclasses.dataclass(frozen=True)
class LanguageSet:
  """A set of languages the race runs on.

  Attributes:
    name: its name in file paths and tables.
    languages: the language codes, one task each.
    low_resource: the languages cut to a few hundred training words.
    seeds: the seeds of its final runs.
  """

  name: str
  languages: tuple[str, ...]
  low_resource: tuple[str, ...]
  seeds: tuple[int, ...]


# The two sets of the multilingual guide, with the seeds of their results there.
LANGUAGE_SETS = {
  "default": LanguageSet(
    "default", data_lib.DEFAULT_LANGUAGES, data_lib.DEFAULT_LOW_RESOURCE, (0, 1, 2)
  ),
  "other": LanguageSet(
    "other",
    (
      "ca",
      "ro",
      "es",
      "it",
      "en",
      "nb",
      "nl",
      "de",
      "ru",
      "uk",
      "bg",
      "mk",
      "pl",
      "cs",
      "sk",
      "sl",
    ),
    ("ca", "nb", "bg", "cs"),
    (10, 11, 12),
  ),
}
FRONT = tuple(name for name, entry in methods_lib.REGISTRY.items() if entry.static)
ALWAYS = ("sum", "pcgrad", "gradvac")
# A factor 2 apart, the main job's 3e-3 in the middle.
LEARNING_RATES = (7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2)
# The measured cost of one run of the default size on a shared 2-core AMD EPYC (AVX2), for
# the plan's estimate before any run has finished.
SECONDS_PER_RUN = 250.0


def _comma_list(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def _tuned_methods() -> tuple[str, ...]:
  return tuple(name for name, entry in methods_lib.REGISTRY.items() if not entry.static)


@dataclasses.dataclass(frozen=True)
class Race:
  """What the race runs.

  Attributes:
    sets: the language sets; the first is also the tuning set.
    methods: the methods tuned (every one also a candidate for the final runs).
    always: the methods of the final runs whatever their tuned score.
    best: how many more of ``methods`` enter the final runs, best validation score first.
    front: static weightings of the sum, run at the sum's chosen rate on the first set.
    learning_rates: the grid, the same for every method.
    tune_seed: the seed of the tuning runs (apart from the sets' seeds).
    validation_words: validation words per language, in every run.
    tune_eval_every: the evaluation period of the tuning runs (the final runs use
      ``experiment.config.eval_every``); the training does not depend on it.
    experiment: data sizes, model and schedule (its languages, methods, seeds and
      learning rate are ignored).
  """

  sets: tuple[LanguageSet, ...] = (LANGUAGE_SETS["default"], LANGUAGE_SETS["other"])
  methods: tuple[str, ...] = dataclasses.field(default_factory=_tuned_methods)
  always: tuple[str, ...] = ALWAYS
  best: int = 3
  front: tuple[str, ...] = FRONT
  learning_rates: tuple[float, ...] = LEARNING_RATES
  tune_seed: int = 100
  validation_words: int = 400
  tune_eval_every: int = 100
  experiment: multilingual.Experiment = dataclasses.field(default_factory=multilingual.Experiment)

  def __post_init__(self) -> None:
    if not self.sets:
      raise ValueError("the race needs at least one language set")
    unknown = [
      name
      for name in (*self.methods, *self.always, *self.front)
      if name not in methods_lib.REGISTRY
    ]
    if unknown:
      raise ValueError(
        f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(methods_lib.REGISTRY)}"
      )
    missing = [name for name in self.always if name not in self.methods]
    if missing:
      raise ValueError(f"--always method(s) {', '.join(missing)} are not tuned (--methods)")
    if self.front and "sum" not in self.methods:
      raise ValueError("the front runs at the sum's rate: tune the sum too")
    if len(self.learning_rates) < 2 or len(set(self.learning_rates)) != len(self.learning_rates):
      raise ValueError(f"the grid needs distinct learning rates, got {self.learning_rates}")
    seeds = {seed for language_set in self.sets for seed in language_set.seeds}
    if self.tune_seed in seeds:
      raise ValueError(f"the tuning seed {self.tune_seed} is also a seed of the final runs")
    if self.validation_words < 1:
      raise ValueError("the race chooses on validation words: validation_words must be >= 1")


@dataclasses.dataclass(frozen=True)
class RaceRun:
  """One run of the race: a method, a learning rate, a seed, a language set."""

  language_set: LanguageSet
  method: str
  learning_rate: float
  seed: int

  def path(self, out: str) -> str:
    """Where its record is saved under ``out``."""
    name = f"lr{self.learning_rate:g}-seed{self.seed}.json"
    return os.path.join(out, "runs", self.language_set.name, self.method, name)


def _run(race: Race, race_run: RaceRun) -> multilingual.Run:
  """The multilingual run of ``race_run``."""
  base = race.experiment
  tuning = race_run.seed == race.tune_seed
  config = dataclasses.replace(
    base.config,
    learning_rate=race_run.learning_rate,
    eval_every=race.tune_eval_every if tuning else base.config.eval_every,
  )
  (method,) = multilingual.resolve_methods([race_run.method], "layer")
  experiment = dataclasses.replace(
    base,
    languages=race_run.language_set.languages,
    low_resource=race_run.language_set.low_resource,
    methods=(method,),
    seeds=(race_run.seed,),
    config=config,
  )
  return multilingual.Run(experiment, method, race_run.seed, race.validation_words)


def _settings(run: multilingual.Run, language_set: str) -> dict:
  """Everything a run's result depends on, as JSON: a saved record must match it."""
  experiment = run.experiment
  return json.loads(
    json.dumps(
      {
        "language_set": language_set,
        "languages": experiment.languages,
        "low_resource": experiment.low_resource,
        "method": dataclasses.asdict(run.method),
        "seed": run.seed,
        "validation_words": run.validation_words,
        "config": dataclasses.asdict(experiment.config),
        "beta": experiment.beta,
        "low_resource_words": experiment.low_resource_words,
        "heldout_words": experiment.heldout_words,
        "pool_size": experiment.pool_size,
      }
    )
  )


def _record(settings: dict, history: train_lib.History) -> dict:
  corrected = history.corrected_fraction
  return {
    "settings": settings,
    "eval_steps": history.eval_steps.tolist(),
    "heldout_bpc": history.heldout_bpc.tolist(),
    "validation_bpc": history.validation_bpc.tolist(),
    "corrected_fraction": None if corrected is None else float(corrected.mean()),
    "seconds": history.seconds,
  }


def _write_json(path: str, content: dict) -> None:
  """Writes ``content`` to ``path`` whole or not at all (a race cut short leaves no half file)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  partial = path + ".partial"
  with open(partial, "w") as file:
    json.dump(content, file)
  os.replace(partial, path)


def _load(race: Race, race_run: RaceRun, out: str) -> dict | None:
  """The saved record of ``race_run``, or ``None``.

  Raises:
    ValueError: if the saved record was made with other settings.
  """
  path = race_run.path(out)
  if not os.path.exists(path):
    return None
  with open(path) as file:
    record = json.load(file)
  settings = _settings(_run(race, race_run), race_run.language_set.name)
  if record["settings"] != settings:
    changed = sorted(key for key in settings if record["settings"].get(key) != settings[key])
    raise ValueError(
      f"{path} was made with other settings ({', '.join(changed)}); "
      "use another output directory or remove it"
    )
  return record


def _train(run: multilingual.Run) -> train_lib.History:
  return multilingual.train_run(run, progress=True)


def execute(
  race: Race,
  race_runs: Sequence[RaceRun],
  out: str,
  *,
  workers: int = 1,
  progress: bool = True,
) -> dict[RaceRun, dict]:
  """Trains the runs that have no record yet, saving each record as it ends.

  Args:
    race: the race.
    race_runs: the runs wanted.
    out: the output directory.
    workers: how many runs train at once, each in its own process.
    progress: whether to show progress bars.

  Returns:
    The record of every run of ``race_runs``.
  """
  records = {race_run: _load(race, race_run, out) for race_run in race_runs}
  pending = [race_run for race_run, record in records.items() if record is None]
  runs = [_run(race, race_run) for race_run in pending]

  def save(index: int, history: train_lib.History) -> None:
    race_run = pending[index]
    records[race_run] = _record(_settings(runs[index], race_run.language_set.name), history)
    _write_json(race_run.path(out), records[race_run])

  train = _train if progress else multilingual.train_run
  parallel.map_runs(train, runs, workers=workers, on_result=save)
  return records


def tuning_runs(race: Race) -> list[RaceRun]:
  """Every method at every rate of the grid, on the first set and the tuning seed."""
  return [
    RaceRun(race.sets[0], method, rate, race.tune_seed)
    for method in race.methods
    for rate in race.learning_rates
  ]


def validation_score(record: dict) -> float:
  """Mean validation bits per character over all languages after the last step."""
  return float(np.mean(record["validation_bpc"][-1]))


def choose_rates(tuning: dict[RaceRun, dict]) -> dict[str, float]:
  """Each method's learning rate: the lowest validation score of its tuning runs.

  Only :func:`validation_score` is looked at, never the held-out words.

  Args:
    tuning: the records of the tuning runs.

  Returns:
    method -> chosen learning rate (the smaller rate on a tie).
  """
  scores: dict[str, list[tuple[float, float]]] = {}
  for race_run, record in tuning.items():
    scores.setdefault(race_run.method, []).append(
      (validation_score(record), race_run.learning_rate)
    )
  return {method: min(pairs)[1] for method, pairs in scores.items()}


def final_methods(race: Race, tuning: dict[RaceRun, dict], chosen: dict[str, float]) -> list[str]:
  """``race.always``, then the ``race.best`` best other tuned methods by validation score."""
  best_score = {
    race_run.method: validation_score(record)
    for race_run, record in tuning.items()
    if race_run.learning_rate == chosen[race_run.method]
  }
  others = sorted(
    (method for method in race.methods if method not in race.always),
    key=lambda method: best_score[method],
  )
  return [*race.always, *others[: race.best]]


def final_runs(race: Race, methods: Iterable[str], chosen: dict[str, float]) -> list[RaceRun]:
  """The final runs of ``methods`` on every set and seed, and the front on the first set."""
  methods = list(methods)
  runs = [
    RaceRun(language_set, method, chosen[method], seed)
    for language_set in race.sets
    for method in methods
    for seed in language_set.seeds
  ]
  runs += [
    RaceRun(race.sets[0], name, chosen["sum"], seed)
    for name in race.front
    for seed in race.sets[0].seeds
  ]
  return runs


def _scores(record: dict, low: np.ndarray) -> dict:
  """Final and best held-out scores over all, the low-resource and the other languages."""
  history = train_lib.History(
    train_loss=np.zeros((0, len(low))),
    eval_steps=np.asarray(record["eval_steps"]),
    heldout_bpc=np.asarray(record["heldout_bpc"]),
    targets=None,
    cosine=None,
    corrected_fraction=None,
    seconds=record["seconds"],
  )
  scores = multilingual.seed_scores([history], low)
  return {kind: {subset: values[0] for subset, values in scores[kind].items()} for kind in scores}


def summarize(race: Race, records: dict[RaceRun, dict]) -> dict:
  """The race's numbers (the content of ``race.json``) from the records there are.

  Args:
    race: the race.
    records: the records of the runs done so far.

  Returns:
    ``tuning`` (method -> rate -> validation score), ``chosen`` (method -> rate, once every
    tuning run of it is done), ``final`` (set -> method -> rate, per-seed held-out scores,
    and per-seed differences from the sum), ``front`` (the same for the weightings),
    ``cpu_seconds`` and the ``race`` settings.
  """
  tuning = {r: records[r] for r in tuning_runs(race) if records.get(r) is not None}
  table: dict[str, dict[str, float]] = {}
  for race_run, record in tuning.items():
    table.setdefault(race_run.method, {})[f"{race_run.learning_rate:g}"] = validation_score(record)
  complete = {
    method
    for method in race.methods
    if all(
      records.get(RaceRun(race.sets[0], method, rate, race.tune_seed)) is not None
      for rate in race.learning_rates
    )
  }
  chosen = {
    method: rate
    for method, rate in choose_rates(
      {r: record for r, record in tuning.items() if r.method in complete}
    ).items()
  }
  results = {"final": {}, "front": {}}
  for race_run, record in records.items():
    if record is None or race_run.seed == race.tune_seed:
      continue
    group = "front" if race_run.method in race.front else "final"
    language_set = race_run.language_set
    low = np.array([code in language_set.low_resource for code in language_set.languages])
    entry = (
      results[group]
      .setdefault(language_set.name, {})
      .setdefault(race_run.method, {"learning_rate": race_run.learning_rate, "seeds": {}})
    )
    entry["seeds"][str(race_run.seed)] = _scores(record, low)
  for group in results.values():
    for set_name, methods in group.items():
      reference = results["final"].get(set_name, {}).get("sum")
      for method, entry in methods.items():
        entry["difference_from_sum"] = (
          None if method == "sum" or reference is None else _differences(entry, reference)
        )
  return {
    "race": _race_settings(race),
    "tuning": table,
    "chosen": chosen,
    **results,
    "cpu_seconds": sum(record["seconds"] for record in records.values() if record is not None),
  }


def _race_settings(race: Race) -> dict:
  """The race's settings as JSON, without the fields of its experiment that it replaces."""
  settings = json.loads(json.dumps(dataclasses.asdict(race)))
  for name in ("languages", "low_resource", "methods", "seeds"):
    del settings["experiment"][name]
  del settings["experiment"]["config"]["learning_rate"]
  return settings


def _differences(entry: dict, reference: dict) -> dict:
  """Per seed, a method's final held-out scores minus the sum's (paired: the same data)."""
  return {
    subset: {
      seed: scores["final"][subset] - reference["seeds"][seed]["final"][subset]
      for seed, scores in entry["seeds"].items()
      if seed in reference["seeds"] and subset in scores["final"]
    }
    for subset in ("all", "low_resource", "others")
  }


def _spread(values: Sequence[float]) -> str:
  if not values:
    return "…"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _difference(values: dict[str, float]) -> str:
  if not values:
    return "…"
  numbers = list(values.values())
  if len(numbers) == 1:
    return f"{numbers[0]:+.3f}"
  return f"{statistics.mean(numbers):+.3f} [{min(numbers):+.3f}, {max(numbers):+.3f}]"


def _score_rows(methods: dict, summaries: dict[str, str]) -> list[str]:
  columns = [("final", "all"), ("final", "low_resource"), ("final", "others")]
  columns += [("best", "all"), ("best", "low_resource")]
  lines = [
    "| method | rate | all, final | low-resource, final | others, final | all, best "
    "| low-resource, best | Δ all, final | Δ low-resource, final |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for method, entry in methods.items():
    seeds = entry["seeds"].values()
    cells = [
      _spread([s[kind][subset] for s in seeds if subset in s[kind]]) for kind, subset in columns
    ]
    differences = entry["difference_from_sum"] or {}
    cells += [_difference(differences.get(subset, {})) for subset in ("all", "low_resource")]
    name = f"{method} ({summaries[method]})" if method in summaries else method
    lines.append(f"| {name} | {entry['learning_rate']:g} | " + " | ".join(cells) + " |")
  return lines


def report(results: dict) -> str:
  """The markdown tables of :func:`summarize`'s results."""
  race = results["race"]
  rates = [f"{rate:g}" for rate in race["learning_rates"]]
  first = race["sets"][0]
  lines = [
    "## Tuning: each method's learning rate, chosen on validation words",
    "",
    f"Mean validation bits per character over all languages after the last step; set "
    f"{first['name']}, seed {race['tune_seed']}, {race['validation_words']} validation words "
    "per language. Bold: the chosen rate (the lowest score); † chosen at an end of the grid.",
    "",
    "| method | " + " | ".join(rates) + " |",
    "|---|" + "---:|" * len(rates),
  ]
  for method, scores in results["tuning"].items():
    chosen = results["chosen"].get(method)
    cells = []
    for rate in rates:
      if rate not in scores:
        cells.append("…")
        continue
      cell = f"{scores[rate]:.4f}"
      if chosen is not None and f"{chosen:g}" == rate:
        edge = " †" if rate in (rates[0], rates[-1]) else ""
        cell = f"**{cell}**{edge}"
      cells.append(cell)
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines.append("")
  every = race["experiment"]["config"]["eval_every"]
  intro = (
    "Held-out bits per character over each subset of languages, mean ± sd over the seeds, "
    f"each method at its chosen rate. Best: the lowest of the evaluations (every {every} "
    "steps). Δ: the method's score minus the sum's, seed by seed (the same data, batches and "
    "initialisation): mean [min, max]."
  )
  for language_set in race["sets"]:
    name = language_set["name"]
    if name in results["final"]:
      lines += [
        f"## Final runs, set {name} (seeds {language_set['seeds']})",
        "",
        intro,
        "",
        *_score_rows(results["final"][name], {}),
        "",
      ]
    if name in results["front"]:
      summaries = {m: methods_lib.REGISTRY[m].summary for m in results["front"][name]}
      lines += [
        f"## The sum's static weightings, set {name}, at the sum's rate",
        "",
        *_score_rows(results["front"][name], summaries),
        "",
      ]
  lines.append(f"CPU time of the runs: {results['cpu_seconds'] / 3600:.2f} h.")
  return "\n".join(lines)


def write_outputs(results: dict, out: str) -> None:
  """Writes ``race.json`` and ``race.md`` into ``out``."""
  _write_json(os.path.join(out, "race.json"), results)
  with open(os.path.join(out, "race.md"), "w") as file:
    file.write(report(results) + "\n")


def _cost(race_runs: Sequence[RaceRun], records: dict, workers: int) -> str:
  done = [record["seconds"] for record in records.values() if record is not None]
  per_run = statistics.median(done) if done else SECONDS_PER_RUN
  left = sum(records.get(race_run) is None for race_run in race_runs)
  hours = left * per_run / 3600
  cores = min(workers, parallel.available_cores())
  source = "the median of the runs done" if done else "measured on a 2-core AMD EPYC"
  return (
    f"{len(race_runs)} runs, {len(race_runs) - left} done, {left} to run: about "
    f"{hours:.1f} CPU-hours, {hours / cores:.1f} h on {cores} core(s) "
    f"(at {per_run:.0f} s a run, {source})"
  )


def run_race(
  race: Race, out: str, *, stage: str = "all", workers: int = 1, progress: bool = True
) -> dict:
  """Runs the race's ``stage`` (``"tune"``, ``"final"`` or ``"all"``) and writes the tables.

  Args:
    race: the race.
    out: the output directory; runs already saved there are not run again.
    stage: ``"tune"`` trains the tuning runs only, ``"final"`` the final runs (every tuning
      run must be done), ``"all"`` both.
    workers: how many runs train at once, each in its own process.
    progress: whether to show progress bars.

  Returns:
    The content of ``race.json`` (see :func:`summarize`).

  Raises:
    ValueError: for an unknown stage, a final stage before the tuning is complete, or a
      saved run made with other settings.
  """
  if stage not in ("tune", "final", "all"):
    raise ValueError(f"unknown stage {stage!r}; valid stages: tune, final, all")
  tuning = tuning_runs(race)
  if stage == "final":
    records = {race_run: _load(race, race_run, out) for race_run in tuning}
    missing = sum(record is None for record in records.values())
    if missing:
      raise ValueError(f"{missing} of {len(tuning)} tuning runs are not done: run --stage tune")
  else:
    records = execute(race, tuning, out, workers=workers, progress=progress)
  if stage != "tune":
    chosen = choose_rates(records)
    final = final_runs(race, final_methods(race, records, chosen), chosen)
    records.update(execute(race, final, out, workers=workers, progress=progress))
  results = summarize(race, records)
  write_outputs(results, out)
  return results


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser."""
  parser = argparse.ArgumentParser(
    prog="python -m optax_gradvac.examples.race", description=__doc__.split("\n\n")[0]
  )
  race = Race()
  parser.add_argument(
    "--stage",
    default="all",
    choices=("tune", "final", "all"),
    help="tune: the tuning runs; final: the final runs (after tune); all: both (default)",
  )
  parser.add_argument(
    "--plan", action="store_true", help="print the runs left and their cost, run nothing"
  )
  parser.add_argument(
    "--sets",
    default=",".join(LANGUAGE_SETS),
    help=f"comma list from {', '.join(LANGUAGE_SETS)}; the first is the tuning set "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--methods",
    default=",".join(race.methods),
    help="the methods tuned, comma list (default: every method of the registry but the "
    "sum's static weightings: %(default)s)",
  )
  parser.add_argument(
    "--always",
    default=",".join(race.always),
    help="the methods of the final runs whatever their score (default %(default)s)",
  )
  parser.add_argument(
    "--best",
    type=int,
    default=race.best,
    help="how many more methods enter the final runs, best validation score first "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--front",
    default=",".join(race.front),
    help="the sum's static weightings, at the sum's rate on the first set, or 'none' "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--learning-rates",
    default=",".join(f"{rate:g}" for rate in race.learning_rates),
    help="the grid, comma list (default %(default)s)",
  )
  parser.add_argument(
    "--seeds",
    type=int,
    help="how many of each set's seeds the final runs use (default: all 3)",
  )
  parser.add_argument(
    "--tune-seed", type=int, default=race.tune_seed, help="the tuning seed (default %(default)s)"
  )
  parser.add_argument(
    "--validation-words",
    type=int,
    default=race.validation_words,
    help="validation words per language (default %(default)s)",
  )
  parser.add_argument(
    "--tune-eval-every",
    type=int,
    default=race.tune_eval_every,
    help="evaluation period of the tuning runs (default %(default)s)",
  )
  default = race.experiment
  sizes = {
    "--steps": default.config.steps,
    "--batch-words": default.config.batch_words,
    "--d-model": default.config.d_model,
    "--num-layers": default.config.num_layers,
    "--num-heads": default.config.num_heads,
    "--eval-every": default.config.eval_every,
    "--heldout-words": default.heldout_words,
    "--low-resource-words": default.low_resource_words,
    "--pool-size": default.pool_size,
  }
  for flag, value in sizes.items():
    parser.add_argument(
      flag, type=int, default=value, help="as in the main job (default %(default)s)"
    )
  parser.add_argument(
    "--out",
    default=os.path.join("runs", "race"),
    help="output directory; runs saved there are not run again (default %(default)s)",
  )
  parser.add_argument(
    "--workers",
    type=int,
    help="runs trained at once, each in its own process (default: the number of cores)",
  )
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Race, argparse.Namespace]:
  """Parses command-line flags into a :class:`Race`.

  Raises:
    SystemExit: with a usage message, for an unknown set or method, or an invalid grid.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    unknown = [name for name in _comma_list(args.sets) if name not in LANGUAGE_SETS]
    if unknown:
      raise ValueError(
        f"unknown set(s) {', '.join(unknown)}; valid sets: {', '.join(LANGUAGE_SETS)}"
      )
    sets = tuple(LANGUAGE_SETS[name] for name in _comma_list(args.sets))
    if args.seeds is not None:
      sets = tuple(dataclasses.replace(s, seeds=s.seeds[: args.seeds]) for s in sets)
    base = Race().experiment
    config = dataclasses.replace(
      base.config,
      steps=args.steps,
      warmup_steps=max(1, args.steps // 20),
      batch_words=args.batch_words,
      d_model=args.d_model,
      num_layers=args.num_layers,
      num_heads=args.num_heads,
      eval_every=args.eval_every,
    )
    race = Race(
      sets=sets,
      methods=tuple(_comma_list(args.methods)),
      always=tuple(_comma_list(args.always)),
      best=args.best,
      front=() if args.front.strip() == "none" else tuple(_comma_list(args.front)),
      learning_rates=tuple(float(rate) for rate in _comma_list(args.learning_rates)),
      tune_seed=args.tune_seed,
      validation_words=args.validation_words,
      tune_eval_every=args.tune_eval_every,
      experiment=dataclasses.replace(
        base,
        config=config,
        heldout_words=args.heldout_words,
        low_resource_words=args.low_resource_words,
        pool_size=args.pool_size,
      ),
    )
  except ValueError as error:
    parser.error(str(error))
  return race, args


def main(argv: Sequence[str] | None = None) -> dict | None:
  """Runs the race (or prints its plan) and writes ``race.md`` and ``race.json``.

  Args:
    argv: command-line flags (``sys.argv[1:]`` when None).

  Returns:
    The content of ``race.json``, or ``None`` with ``--plan``.
  """
  race, args = parse_args(argv)
  workers = args.workers or parallel.default_workers(len(tuning_runs(race)))
  if args.plan:
    tuning = tuning_runs(race)
    records = {race_run: _load(race, race_run, args.out) for race_run in tuning}
    print("Tuning: " + _cost(tuning, records, workers))
    if all(record is not None for record in records.values()):
      chosen = choose_rates(records)
      final = final_runs(race, final_methods(race, records, chosen), chosen)
      records.update({race_run: _load(race, race_run, args.out) for race_run in final})
      print("Final: " + _cost(final, records, workers))
    else:
      per_set = len(race.always) + race.best
      count = sum(per_set * len(s.seeds) for s in race.sets) + len(race.front) * len(
        race.sets[0].seeds
      )
      print(f"Final: {count} runs, once the tuning is done")
    return None
  results = run_race(
    race, args.out, stage=args.stage, workers=workers, progress=not args.no_progress
  )
  print("\n" + report(results) + f"\n\nWritten to {args.out}/.")
  return results


if __name__ == "__main__":
  main()
