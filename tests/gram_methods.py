"""Every Gram-based method of the library, by name, as a factory of ``num_tasks``."""

import functools

import optax_gradvac as ogv

METHODS = {
  "gradvac": functools.partial(ogv.gradvac, beta=0.3),
  "pcgrad": ogv.pcgrad,
  "mgda": ogv.mgda,
  "upgrad": ogv.upgrad,
  "cagrad": ogv.cagrad,
  "imtl_g": ogv.imtl_g,
  "aligned_mtl": ogv.aligned_mtl,
  "nash_mtl": ogv.nash_mtl,
  "fairgrad": ogv.fairgrad,
  "dualproj": ogv.dualproj,
  "config": ogv.config,
  "rlw": ogv.rlw,
  "gradnorm": ogv.gradnorm,
}
