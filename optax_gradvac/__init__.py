"""Multi-task gradient surgery for Optax: Gradient Vaccine and PCGrad."""

from optax_gradvac._accumulation import multi_steps as multi_steps
from optax_gradvac._algorithm import Surgery as Surgery
from optax_gradvac._algorithm import gradvac_coefficients as gradvac_coefficients
from optax_gradvac._algorithm import pairwise_cosine as pairwise_cosine
from optax_gradvac._algorithm import visiting_order as visiting_order
from optax_gradvac._logging import similarity_summary as similarity_summary
from optax_gradvac._pytree import group_names as group_names
from optax_gradvac._serialization import from_bytes as from_bytes
from optax_gradvac._serialization import to_bytes as to_bytes
from optax_gradvac._task_gradients import segment_value_and_grad as segment_value_and_grad
from optax_gradvac._task_gradients import task_value_and_grad as task_value_and_grad
from optax_gradvac._transform import GradVacState as GradVacState
from optax_gradvac._transform import gradvac as gradvac
from optax_gradvac._transform import mean_tasks as mean_tasks
from optax_gradvac._transform import pcgrad as pcgrad
from optax_gradvac._transform import sum_tasks as sum_tasks

__version__ = "0.1.0"

__all__ = (
  "GradVacState",
  "Surgery",
  "from_bytes",
  "gradvac",
  "gradvac_coefficients",
  "group_names",
  "mean_tasks",
  "multi_steps",
  "pairwise_cosine",
  "pcgrad",
  "segment_value_and_grad",
  "similarity_summary",
  "sum_tasks",
  "task_value_and_grad",
  "to_bytes",
  "visiting_order",
)
