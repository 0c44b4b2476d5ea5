"""Obviously-correct float64 references, written from the papers' pseudo-code.

Plain Python loops over tasks and pairs on flattened numpy vectors: no Gram
matrices, no vectorisation, nothing shared with the library.
"""

import numpy as np


def gradvac_group(
  grads: np.ndarray, targets: np.ndarray, order: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Algorithm 1 of Wang et al. (2021) for one group.

  Args:
    grads: [T, P] task gradients of the group.
    targets: [T, T] EMA similarity goals.
    order: [T, T - 1] partner order of every task.
    beta: EMA rate.

  Returns:
    The corrected gradients [T, P], the new targets and the corrected pairs.
  """
  grads = np.asarray(grads, np.float64)
  num_tasks = grads.shape[0]
  present = [bool(np.any(grads[i] != 0)) for i in range(num_tasks)]
  new_targets = np.array(targets, np.float64)
  corrected = np.zeros((num_tasks, num_tasks), bool)
  corrected_grads = grads.copy()
  for i in range(num_tasks):
    g_i = grads[i].copy()
    for j in order[i]:
      if not (present[i] and present[j]):
        continue
      g_j = grads[j]
      norms = np.linalg.norm(g_i) * np.linalg.norm(g_j)
      phi = min(max(g_i @ g_j / norms, -1.0), 1.0) if norms > 0 else 0.0
      t = targets[i, j]
      if phi < t:
        g_i = g_i + (
          np.linalg.norm(g_i)
          * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2))
          / (np.linalg.norm(g_j) * np.sqrt(1 - t**2))
          * g_j
        )
        corrected[i, j] = True
      new_targets[i, j] = (1 - beta) * t + beta * phi
    corrected_grads[i] = g_i
  return corrected_grads, new_targets, corrected


def pcgrad_group(grads: np.ndarray, order: np.ndarray) -> np.ndarray:
  """PCGrad (Yu et al. 2020) for one group: the corrected gradients [T, P]."""
  grads = np.asarray(grads, np.float64)
  corrected_grads = grads.copy()
  for i in range(grads.shape[0]):
    g_i = grads[i].copy()
    for j in order[i]:
      g_j = grads[j]
      if g_i @ g_j < 0:
        g_i = g_i - (g_i @ g_j) / (g_j @ g_j) * g_j
    corrected_grads[i] = g_i
  return corrected_grads


def cosine_matrix(grads: np.ndarray) -> np.ndarray:
  """Pairwise cosines of [T, P] vectors; 0 in rows and columns of zero vectors."""
  grads = np.asarray(grads, np.float64)
  num_tasks = grads.shape[0]
  cosine = np.zeros((num_tasks, num_tasks))
  for i in range(num_tasks):
    for j in range(num_tasks):
      norms = np.linalg.norm(grads[i]) * np.linalg.norm(grads[j])
      if norms > 0:
        cosine[i, j] = grads[i] @ grads[j] / norms
  return cosine


def gradvac_tree(
  grads: dict[str, np.ndarray],
  groups: list[list[str]],
  targets: np.ndarray,
  orders: np.ndarray,
  beta: float,
  reduction: str = "sum",
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
  """GradVac on a flat dict of [T, ...] leaves whose groups are given by name.

  Returns the update per leaf, the new targets, the cosines of the original
  gradients and the corrected pairs, each of the last three [G, T, T].
  """
  update, new_targets, cosines, corrected = {}, [], [], []
  for group, names in enumerate(groups):
    num_tasks = grads[names[0]].shape[0]
    flat = np.concatenate([np.reshape(grads[name], (num_tasks, -1)) for name in names], axis=1)
    corrected_grads, group_targets, group_corrected = gradvac_group(
      flat, targets[group], orders[group], beta
    )
    total = corrected_grads.sum(0) / (num_tasks if reduction == "mean" else 1)
    offset = 0
    for name in names:
      size = int(np.prod(grads[name].shape[1:]))
      update[name] = total[offset : offset + size].reshape(grads[name].shape[1:])
      offset += size
    new_targets.append(group_targets)
    cosines.append(cosine_matrix(flat))
    corrected.append(group_corrected)
  return update, np.stack(new_targets), np.stack(cosines), np.stack(corrected)
