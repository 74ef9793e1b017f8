"""Benchmark evaluation: metrics, baselines and prior knowledge, as pure functions on arrays.

Submodules (imported on demand so that ``import cellduality.eval`` stays cheap):

* :mod:`cellduality.eval.metrics` — classification, conditional-generation and perturbation metrics,
  and the single-cell ``verifier_*`` rewards;
* :mod:`cellduality.eval.baselines` — majority / kNN / logistic regression, class-mean sentences,
  control / mean-perturbation / GO-neighbour predictors and split-half reproducibility (a reference
  of the real cells, not an upper bound);
* :mod:`cellduality.eval.metric_info` — the metric registry (friendly name, direction, best value) and
  the check that keeps the word "ceiling" for rows that really bound the others;
* :mod:`cellduality.eval.headline` — per task the headline numbers against the simplest and the
  strongest baseline, with a verdict; :mod:`cellduality.eval.plots` — the report's PNG plots;
* :mod:`cellduality.eval.knowledge` — PROGENy pathway weights and GO Biological Process annotations
  shipped in ``cellduality/knowledge/``.
"""
