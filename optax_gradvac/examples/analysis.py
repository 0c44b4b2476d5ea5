"""Clustering of task-similarity matrices, family recovery, tables and plots.

A similarity matrix here is ``[T, T]``: the GradVac ``targets`` averaged over parameter
groups, or the cosine between the original task gradients. Languages are clustered by
average linkage on ``1 - similarity`` (after symmetrising), and the clusters are compared
with the language families.

The plots are built on :class:`matplotlib.figure.Figure` objects rather than ``pyplot``:
saving them renders with Agg, needs no display, and leaves the caller's backend (e.g. a
notebook's) alone. Each plotting function returns its figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.cluster import hierarchy
from scipy.spatial import distance

_FAMILY_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def symmetrize(matrix: np.ndarray) -> np.ndarray:
  """Returns ``(matrix + matrix.T) / 2``.

  GradVac targets are not symmetric (row ``i`` is the corrected gradient, column ``j`` the
  original one); clustering needs one similarity per pair.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  return (matrix + matrix.T) / 2


def adjusted_rand_index(labels_a: Sequence, labels_b: Sequence) -> float:
  """The adjusted Rand index of two partitions of the same items (Hubert and Arabie, 1985).

  1.0 for identical partitions (whatever the label names), about 0 for independent ones,
  negative for partitions that disagree more than chance.

  Args:
    labels_a: one label per item.
    labels_b: one label per item, in the same item order.

  Returns:
    The index, a float in ``[-1, 1]``.

  Example:
    >>> adjusted_rand_index([0, 0, 1, 1], ["x", "x", "y", "y"])
    1.0
    >>> round(adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]), 4)
    0.5714
  """
  if len(labels_a) != len(labels_b):
    raise ValueError(f"partitions of {len(labels_a)} and {len(labels_b)} items")
  a = np.unique(np.asarray(labels_a), return_inverse=True)[1].ravel()
  b = np.unique(np.asarray(labels_b), return_inverse=True)[1].ravel()
  contingency = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(contingency, (a, b), 1)

  def pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) / 2).sum())

  index = pairs(contingency)
  pairs_a, pairs_b = pairs(contingency.sum(1)), pairs(contingency.sum(0))
  expected = pairs_a * pairs_b / pairs(np.array(len(a)))
  maximum = (pairs_a + pairs_b) / 2
  if maximum == expected:  # both partitions trivial (one cluster, or all singletons)
    return 1.0
  return (index - expected) / (maximum - expected)


def family_similarity(similarity: np.ndarray, families: Sequence[str]) -> tuple[float, float]:
  """Mean off-diagonal similarity within families and across families.

  Args:
    similarity: ``[T, T]`` similarities.
    families: the family of each task.

  Returns:
    ``(within, across)``; ``within`` is NaN if no family has two members.
  """
  families = np.asarray(families)
  same = families[:, None] == families[None, :]
  off_diagonal = ~np.eye(len(families), dtype=bool)
  similarity = np.asarray(similarity, dtype=np.float64)
  within = similarity[same & off_diagonal]
  return (float(within.mean()) if within.size else float("nan")), float(similarity[~same].mean())


def family_permutation_test(
  similarity: np.ndarray,
  families: Sequence[str],
  *,
  num_permutations: int = 10_000,
  seed: int = 0,
) -> float:
  """P-value of "related tasks are more similar", without a clustering cut.

  The statistic is the within-family minus the across-family mean similarity of the
  symmetrised matrix; the null distribution permutes the family labels over the tasks
  (the family sizes stay fixed). Unlike the adjusted Rand index of one cut, it does not
  hang on how a dendrogram happens to split near-ties.

  Args:
    similarity: ``[T, T]`` similarities; the diagonal is ignored.
    families: the family of each task.
    num_permutations: the number of random relabellings.
    seed: the seed of the relabellings.

  Returns:
    ``(1 + #{permutations at least as extreme}) / (1 + num_permutations)``: the one-sided
    Monte Carlo p-value, never 0.

  Example:
    >>> import numpy as np
    >>> families = ["a"] * 4 + ["b"] * 4
    >>> same = np.equal.outer(families, families)
    >>> family_permutation_test(np.where(same, 0.5, 0.1), families, num_permutations=999)
    0.021
  """
  similarity = symmetrize(similarity)
  families = np.asarray(families)
  off_diagonal = ~np.eye(len(families), dtype=bool)
  pairs = similarity[off_diagonal]

  def statistic(labels: np.ndarray) -> np.ndarray:  # labels: [N, T]
    same = (labels[:, :, None] == labels[:, None, :])[:, off_diagonal]
    within = (same * pairs).sum(1) / np.maximum(same.sum(1), 1)
    across = (~same * pairs).sum(1) / np.maximum((~same).sum(1), 1)
    return within - across

  rng = np.random.default_rng(seed)
  shuffled = rng.permuted(np.broadcast_to(families, (num_permutations, len(families))), axis=1)
  observed = statistic(families[None])[0]
  extreme = np.sum(statistic(shuffled) >= observed - 1e-12)
  return float((1 + extreme) / (1 + num_permutations))


@dataclasses.dataclass(frozen=True, eq=False)
class Clustering:
  """Hierarchical clustering of tasks by similarity.

  Attributes:
    linkage: the scipy linkage matrix, ``[T - 1, 4]``.
    labels: the cluster (1-based) of each task in the cut into ``num_clusters``.
    order: the dendrogram's leaf order (task indices).
  """

  linkage: np.ndarray
  labels: np.ndarray
  order: np.ndarray


def cluster(similarity: np.ndarray, num_clusters: int, method: str = "average") -> Clustering:
  """Clusters tasks hierarchically on the distance ``1 - symmetrize(similarity)``.

  Args:
    similarity: ``[T, T]`` similarities; the diagonal is ignored.
    num_clusters: the number of clusters of the flat cut.
    method: the scipy linkage method.

  Returns:
    The :class:`Clustering`.
  """
  distances = 1.0 - symmetrize(similarity)
  np.fill_diagonal(distances, 0.0)
  linkage = hierarchy.linkage(distance.squareform(distances, checks=False), method=method)
  return Clustering(
    linkage=linkage,
    labels=hierarchy.fcluster(linkage, t=num_clusters, criterion="maxclust"),
    order=hierarchy.leaves_list(linkage),
  )


def family_recovery(
  similarity: np.ndarray, languages: Sequence[str], families: Sequence[str]
) -> dict:
  """How well a similarity matrix recovers the language families.

  Args:
    similarity: ``[T, T]`` similarities (e.g. averaged GradVac targets).
    languages: the language of each task.
    families: the family of each task.

  Returns:
    A JSON-ready dict: ``ari`` (adjusted Rand index of the cut into as many clusters as
    there are families), ``within_family`` and ``across_family`` (mean similarities of the
    symmetrised matrix), ``permutation_p_value`` (:func:`family_permutation_test`: is the
    within-family similarity higher than chance?), ``clusters`` (language -> cluster id),
    ``order`` (languages in dendrogram order) and ``matrix`` (the similarity matrix as given).
  """
  clustering = cluster(similarity, num_clusters=len(set(families)))
  within, across = family_similarity(symmetrize(similarity), families)
  return {
    "ari": adjusted_rand_index(families, clustering.labels),
    "within_family": within,
    "across_family": across,
    "permutation_p_value": family_permutation_test(similarity, families),
    "clusters": {
      code: int(label) for code, label in zip(languages, clustering.labels, strict=True)
    },
    "order": [languages[i] for i in clustering.order],
    "matrix": np.asarray(similarity, dtype=np.float64).tolist(),
  }


def _family_colors(families: Sequence[str]) -> dict[str, str]:
  unique = list(dict.fromkeys(families))
  return {family: _FAMILY_COLORS[i % len(_FAMILY_COLORS)] for i, family in enumerate(unique)}


def plot_similarity(
  similarity: np.ndarray,
  languages: Sequence[str],
  families: Sequence[str],
  title: str,
  path: str | None = None,
) -> Figure:
  """A heatmap of the symmetrised similarities, ordered by a dendrogram drawn above.

  Tick labels are coloured by family; the diagonal is left blank.

  Args:
    similarity: ``[T, T]`` similarities.
    languages: the language of each task.
    families: the family of each task.
    title: the figure title.
    path: if given, the PNG file to write.

  Returns:
    The figure.
  """
  matrix = symmetrize(similarity)
  clustering = cluster(matrix, num_clusters=len(set(families)))
  order = clustering.order
  shown = matrix[np.ix_(order, order)]
  np.fill_diagonal(shown, np.nan)
  limit = np.nanmax(np.abs(shown))

  fig = Figure(figsize=(6.4, 7.2))
  grid = fig.add_gridspec(2, 2, height_ratios=(1, 4), width_ratios=(20, 1), hspace=0.02)
  tree_axis = fig.add_subplot(grid[0, 0])
  hierarchy.dendrogram(
    clustering.linkage, ax=tree_axis, no_labels=True, color_threshold=0, above_threshold_color="k"
  )
  # Similarities are small, so every merge sits near distance 1: zoom on the merge heights
  # to make the tree's shape visible.
  heights = clustering.linkage[:, 2]
  margin = 0.1 * (heights.max() - heights.min()) + 1e-12
  tree_axis.set_ylim(heights.min() - margin, heights.max() + margin)
  tree_axis.set_axis_off()
  tree_axis.set_title(title)
  heat_axis = fig.add_subplot(grid[1, 0])
  image = heat_axis.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit)
  labels = [languages[i] for i in order]
  heat_axis.set_xticks(range(len(order)), labels, rotation=90)
  heat_axis.set_yticks(range(len(order)), labels)
  colors = _family_colors(families)
  for ticks in (heat_axis.get_xticklabels(), heat_axis.get_yticklabels()):
    for tick, i in zip(ticks, order, strict=True):
      tick.set_color(colors[families[i]])
  handles = [Line2D([], [], color=color, lw=4, label=family) for family, color in colors.items()]
  heat_axis.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)
  fig.colorbar(image, cax=fig.add_subplot(grid[1, 1]))
  if path is not None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
  return fig


def plot_curves(
  curves: Mapping[str, Mapping[str, np.ndarray]],
  low_resource_mask: np.ndarray,
  path: str | None = None,
  smoothing: int = 20,
) -> Figure:
  """Training curves: training loss (left) and held-out bits per character (right).

  Args:
    curves: method -> ``{"train_loss": [steps, T] nats, "eval_steps": [E],
      "heldout_bpc": [E, T]}`` (e.g. averaged over seeds).
    low_resource_mask: bool ``[T]``, the low-resource languages (dashed lines on the right;
      none drawn if no language is low-resource).
    path: if given, the PNG file to write.
    smoothing: the moving-average window of the training loss, in steps.

  Returns:
    The figure.
  """
  fig = Figure(figsize=(11, 4.2), layout="tight")
  loss_axis, heldout_axis = fig.subplots(1, 2)
  loss_top = -np.inf
  for i, (method, curve) in enumerate(curves.items()):
    color = f"C{i}"
    bits = np.asarray(curve["train_loss"]).mean(1) / np.log(2)
    window = max(1, min(smoothing, len(bits)))
    smoothed = np.convolve(bits, np.ones(window) / window, mode="valid")
    loss_axis.plot(np.arange(window, len(bits) + 1), smoothed, color=color, label=method)
    loss_top = max(loss_top, smoothed[len(smoothed) // 10])
    steps, heldout = curve["eval_steps"], np.asarray(curve["heldout_bpc"])
    heldout_axis.plot(steps, heldout.mean(1), color=color, marker="o", ms=3, label=f"{method}: all")
    if low_resource_mask.any():
      heldout_axis.plot(
        steps,
        heldout[:, low_resource_mask].mean(1),
        color=color,
        ls="--",
        marker="o",
        ms=3,
        label=f"{method}: low-resource",
      )
  # The first tenth of training falls steeply; clipping it keeps the methods' gaps visible.
  loss_axis.set_ylim(top=loss_top)
  loss_axis.set(xlabel="step", ylabel="bits per character", title="training loss (all languages)")
  heldout_axis.set(xlabel="step", ylabel="bits per character", title="held-out words")
  for axis in (loss_axis, heldout_axis):
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def bpc_table(
  bpc: Mapping[str, Sequence[float]],
  languages: Sequence[str],
  families: Sequence[str],
  low_resource: Sequence[str],
) -> str:
  """A markdown table of held-out bits per character: languages by methods, with means.

  With several methods, the lowest (best) value of each row is in bold; low-resource
  languages are starred.

  Args:
    bpc: method -> per-language bits per character, in ``languages`` order.
    languages: the language codes.
    families: the family of each language.
    low_resource: the low-resource languages.

  Returns:
    The table, one row per language, then the means over all languages and over the
    low-resource and the other languages (when there are low-resource ones).
  """
  methods = list(bpc)
  values = np.array([bpc[method] for method in methods], dtype=np.float64).T  # [T, methods]
  low = np.array([code in low_resource for code in languages])
  rows = [
    (f"{code}{'*' if is_low else ''} ({family})", row)
    for code, family, is_low, row in zip(languages, families, low, values, strict=True)
  ]
  rows.append(("**mean, all**", values.mean(0)))
  if low.any():
    rows.append(("**mean, low-resource\\***", values[low].mean(0)))
    if (~low).any():
      rows.append(("**mean, others**", values[~low].mean(0)))
  lines = [
    "| language | " + " | ".join(methods) + " |",
    "|---|" + "---:|" * len(methods),
  ]
  for name, row in rows:
    best = row.min() if len(methods) > 1 else None
    cells = [f"**{x:.3f}**" if x == best else f"{x:.3f}" for x in row]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
