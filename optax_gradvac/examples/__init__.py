"""Worked examples for ``optax_gradvac``.

These modules need the ``examples`` extra (``pip install optax_gradvac[examples]``):

- :mod:`optax_gradvac.examples.data`: multilingual word lists from ``wordfreq``.
- :mod:`optax_gradvac.examples.model`: a small character-level transformer over words.
- :mod:`optax_gradvac.examples.train`: the training loop and held-out evaluation.
- :mod:`optax_gradvac.examples.analysis`: clustering, family recovery and plots.
- :mod:`optax_gradvac.examples.multilingual`: the command line
  (``python -m optax_gradvac.examples.multilingual``).
"""
