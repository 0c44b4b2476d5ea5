"""Worked examples for ``optax_gradvac``.

These modules need the ``examples`` extra (``pip install optax_gradvac[examples]``):

- :mod:`optax_gradvac.examples.data`: multilingual word lists from ``wordfreq``.
- :mod:`optax_gradvac.examples.model`: a small character-level transformer over words.
- :mod:`optax_gradvac.examples.train`: the training loop and held-out evaluation.
- :mod:`optax_gradvac.examples.methods`: the registry of the methods it can run.
- :mod:`optax_gradvac.examples.parallel`: independent runs side by side, one process per core.
- :mod:`optax_gradvac.examples.analysis`: clustering, family recovery and plots.
- :mod:`optax_gradvac.examples.multilingual`: the command line
  (``python -m optax_gradvac.examples.multilingual``).
- :mod:`optax_gradvac.examples.race`: every method's learning rate tuned on validation words,
  then scored on held-out words (``python -m optax_gradvac.examples.race``).
"""
