"""Benchmark evaluation: generate with each model, score every task next to the baselines, report.

The formulas (metrics, baselines, the metric registry, the shipped prior knowledge) are the metrics
library, :mod:`cellduality.metrics`, a floor below the tasks; this package applies them to prepared
folders and models. Submodules (imported on demand so that ``import cellduality.eval`` stays cheap):

* :mod:`cellduality.eval.runner`, :mod:`~cellduality.eval.scoring` — ``cellduality eval``: cached
  generation (:mod:`cellduality.inference`, which predict and the dual check use too), then every task
  scored;
* :mod:`cellduality.eval.report`, :mod:`~cellduality.eval.markdown`, :mod:`~cellduality.eval.plots` —
  ``metrics.json``, ``report.md`` and PNG plots, every column's name and direction read from
  :mod:`cellduality.metrics.registry`;
* :mod:`cellduality.eval.headline` — per task the headline numbers against the simplest and the
  strongest baseline, with a verdict.
"""
