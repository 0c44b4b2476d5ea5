"""Multi-task gradient surgery for Optax: Gradient Vaccine and PCGrad."""

from optax_gradvac import _jaxlib
from optax_gradvac._accumulation import multi_steps as multi_steps
from optax_gradvac._gram import pairwise_cosine as pairwise_cosine
from optax_gradvac._logging import similarity_summary as similarity_summary
from optax_gradvac._loss_weighting.weightings import DWAState as DWAState
from optax_gradvac._loss_weighting.weightings import FAMOState as FAMOState
from optax_gradvac._loss_weighting.weightings import LossWeighting as LossWeighting
from optax_gradvac._loss_weighting.weightings import dwa as dwa
from optax_gradvac._loss_weighting.weightings import famo as famo
from optax_gradvac._loss_weighting.weightings import gls as gls
from optax_gradvac._loss_weighting.weightings import imtl_l as imtl_l
from optax_gradvac._loss_weighting.weightings import stch as stch
from optax_gradvac._loss_weighting.weightings import uw as uw
from optax_gradvac._methods.aligned_mtl import aligned_mtl as aligned_mtl
from optax_gradvac._methods.aligned_mtl import aligned_mtl_weights as aligned_mtl_weights
from optax_gradvac._methods.baselines import mean_tasks as mean_tasks
from optax_gradvac._methods.baselines import sum_tasks as sum_tasks
from optax_gradvac._methods.cagrad import cagrad as cagrad
from optax_gradvac._methods.cagrad import cagrad_weights as cagrad_weights
from optax_gradvac._methods.config import config as config
from optax_gradvac._methods.config import config_weights as config_weights
from optax_gradvac._methods.dualproj import dualproj as dualproj
from optax_gradvac._methods.dualproj import dualproj_weights as dualproj_weights
from optax_gradvac._methods.fairgrad import fairgrad as fairgrad
from optax_gradvac._methods.fairgrad import fairgrad_weights as fairgrad_weights
from optax_gradvac._methods.gradnorm import GradNormState as GradNormState
from optax_gradvac._methods.gradnorm import gradnorm as gradnorm
from optax_gradvac._methods.gradvac import GradVacState as GradVacState
from optax_gradvac._methods.gradvac import Surgery as Surgery
from optax_gradvac._methods.gradvac import gradvac as gradvac
from optax_gradvac._methods.gradvac import gradvac_coefficients as gradvac_coefficients
from optax_gradvac._methods.gradvac import pcgrad as pcgrad
from optax_gradvac._methods.gradvac import visiting_order as visiting_order
from optax_gradvac._methods.imtl_g import imtl_g as imtl_g
from optax_gradvac._methods.imtl_g import imtl_g_weights as imtl_g_weights
from optax_gradvac._methods.mgda import mgda as mgda
from optax_gradvac._methods.mgda import mgda_weights as mgda_weights
from optax_gradvac._methods.nash_mtl import NashMTLSolution as NashMTLSolution
from optax_gradvac._methods.nash_mtl import NashMTLState as NashMTLState
from optax_gradvac._methods.nash_mtl import nash_mtl as nash_mtl
from optax_gradvac._methods.nash_mtl import nash_mtl_weights as nash_mtl_weights
from optax_gradvac._methods.rlw import RLWState as RLWState
from optax_gradvac._methods.rlw import rlw as rlw
from optax_gradvac._methods.upgrad import upgrad as upgrad
from optax_gradvac._methods.upgrad import upgrad_weights as upgrad_weights
from optax_gradvac._pipeline import GramState as GramState
from optax_gradvac._pytree import StackedLayers as StackedLayers
from optax_gradvac._pytree import group_names as group_names
from optax_gradvac._serialization import from_bytes as from_bytes
from optax_gradvac._serialization import to_bytes as to_bytes
from optax_gradvac._tap import Carrier as Carrier
from optax_gradvac._tap import tap as tap
from optax_gradvac._tap import tapped_value_and_grad as tapped_value_and_grad
from optax_gradvac._tap import tapped_vmap as tapped_vmap
from optax_gradvac._task_gradients import segment_value_and_grad as segment_value_and_grad
from optax_gradvac._task_gradients import task_value_and_grad as task_value_and_grad

__version__ = "0.1.0"

_jaxlib.warn_if_miscompiling()

__all__ = (
  "Carrier",
  "DWAState",
  "FAMOState",
  "GradNormState",
  "GradVacState",
  "GramState",
  "LossWeighting",
  "NashMTLSolution",
  "NashMTLState",
  "RLWState",
  "StackedLayers",
  "Surgery",
  "aligned_mtl",
  "aligned_mtl_weights",
  "cagrad",
  "cagrad_weights",
  "config",
  "config_weights",
  "dualproj",
  "dualproj_weights",
  "dwa",
  "fairgrad",
  "fairgrad_weights",
  "famo",
  "from_bytes",
  "gls",
  "gradnorm",
  "gradvac",
  "gradvac_coefficients",
  "group_names",
  "imtl_g",
  "imtl_g_weights",
  "imtl_l",
  "mean_tasks",
  "mgda",
  "mgda_weights",
  "multi_steps",
  "nash_mtl",
  "nash_mtl_weights",
  "pairwise_cosine",
  "pcgrad",
  "rlw",
  "segment_value_and_grad",
  "similarity_summary",
  "stch",
  "sum_tasks",
  "tap",
  "tapped_value_and_grad",
  "tapped_vmap",
  "task_value_and_grad",
  "to_bytes",
  "upgrad",
  "upgrad_weights",
  "uw",
  "visiting_order",
)
