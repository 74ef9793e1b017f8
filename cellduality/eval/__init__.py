"""Benchmark evaluation: metrics, baselines and prior knowledge, as pure functions on arrays.

Submodules (imported on demand so that ``import cellduality.eval`` stays cheap):

* :mod:`cellduality.eval.metrics` — classification, conditional-generation and perturbation metrics,
  and the single-cell ``verifier_*`` rewards;
* :mod:`cellduality.eval.baselines` — majority / kNN / logistic regression, class-mean sentences,
  control / mean-perturbation / GO-neighbour predictors and the split-half reproducibility ceiling;
* :mod:`cellduality.eval.knowledge` — PROGENy pathway weights and GO Biological Process annotations
  shipped in ``cellduality/knowledge/``.
"""
