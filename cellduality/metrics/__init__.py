"""Metrics on plain arrays, each formula written once: the floor below the tasks.

A module here imports numpy, scipy, pandas and the lowest floor of ``cellduality`` (``parsing``,
``rwjs``, ``topk``) only, so that tasks, rewards and the evaluation can all call the same formula
(``tests/test_layers.py`` holds this). It holds, so far:

* :mod:`cellduality.metrics.statistics`: the Pearson correlation every score is built on;
* :mod:`cellduality.metrics.perturbation`: the DE genes of a response and the Pearson delta on them.

The rest of the evaluation's metrics still live in :mod:`cellduality.eval.metrics`, which calls these.
"""
