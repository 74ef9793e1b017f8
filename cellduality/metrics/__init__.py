"""The metrics library: every formula the evaluation, the rewards and the tasks score with, written once.

It is the floor right above the base modules (``parsing``, ``rwjs``, ``topk``) and below everything
else: a module here imports numpy, scipy, pandas, scikit-learn, the standard library and that base floor
only (``tests/test_layers.py`` holds this), and takes plain arrays and label lists, never a model, a
prepared folder or a dataset. So the tasks, the rewards and the evaluation call the same formula.

* :mod:`~cellduality.metrics.statistics`: Pearson, Spearman, cosine, RMSE, shares, Spearman-Brown;
* :mod:`~cellduality.metrics.arrays`: cells x genes matrices, mean profiles and deltas from the control;
* :mod:`~cellduality.metrics.classification`: accuracy, macro-F1, confusion, valid-output and format rates;
* :mod:`~cellduality.metrics.generation`: PCA embedding, kNN@k accuracy, scFID, RWJS to the nearest cell;
* :mod:`~cellduality.metrics.perturbation`: DE genes, the Pearson delta (on DE genes), RMSE, DE Spearman,
  retrieval; :mod:`~cellduality.metrics.pathways`: PROGENy pathway activity and agreement;
* :mod:`~cellduality.metrics.verifier`: one generated cell against the observed response (verifier rewards);
* :mod:`~cellduality.metrics.baselines`: classifiers, class-mean sentences, perturbation predictors (control,
  mean perturbation, training mean, GO graph neighbour), split-half reproducibility;
* :mod:`~cellduality.metrics.knowledge`: the PROGENy weights and GO annotations the package ships;
* :mod:`~cellduality.metrics.registry`: per metric key its function, label, direction and best value,
  which every report reads.

Every function accepts empty or degenerate input and answers with a documented value instead of
raising: a *rate* over zero items or a *score* that cannot be computed is ``nan``; a *verifier reward*
is never ``nan`` (the lowest value of its range). The formulas are importable from here
(``from cellduality import metrics as m; m.pearson_delta_de(...)``); baselines, knowledge and the
registry from their modules.
"""

from cellduality.metrics.arrays import Matrix, cell_delta, deltas, dense, finite_rows, mean_profile
from cellduality.metrics.classification import (
    accuracy,
    classification_metrics,
    confusion,
    format_rate,
    macro_f1,
    valid_output_rate,
)
from cellduality.metrics.generation import (
    Embedder,
    PCAEmbedder,
    fit_pca_embedder,
    frechet_distance,
    generation_metrics,
    knn_accuracy,
    knn_hits,
    rwjs_nearest,
    scfid,
    scfid_by_condition,
)
from cellduality.metrics.pathways import (
    PathwayAgreement,
    PathwayWeights,
    align_pathway_weights,
    pathway_activity,
    pathway_agreement,
)
from cellduality.metrics.perturbation import (
    de_gene_indices,
    de_spearman,
    pearson_delta,
    pearson_delta_de,
    pearson_delta_on_de,
    perturbation_metrics,
    retrieval_scores,
    rmse_de,
    rmse_on_de,
    spearman_on_de,
)
from cellduality.metrics.statistics import (
    NAN,
    average_ranks,
    cosine,
    nanmean,
    pearson,
    pearson_rows,
    rmse,
    share,
    spearman,
    spearman_brown,
)
from cellduality.metrics.verifier import (
    verifier_de_spearman,
    verifier_pathway,
    verifier_pearson_de,
    verifier_rmse_de,
)

__all__ = [
    "NAN",
    "Embedder",
    "Matrix",
    "PCAEmbedder",
    "PathwayAgreement",
    "PathwayWeights",
    "accuracy",
    "align_pathway_weights",
    "average_ranks",
    "cell_delta",
    "classification_metrics",
    "confusion",
    "cosine",
    "de_gene_indices",
    "de_spearman",
    "deltas",
    "dense",
    "finite_rows",
    "fit_pca_embedder",
    "format_rate",
    "frechet_distance",
    "generation_metrics",
    "knn_accuracy",
    "knn_hits",
    "macro_f1",
    "mean_profile",
    "nanmean",
    "pathway_activity",
    "pathway_agreement",
    "pearson",
    "pearson_delta",
    "pearson_delta_de",
    "pearson_delta_on_de",
    "pearson_rows",
    "perturbation_metrics",
    "retrieval_scores",
    "rmse",
    "rmse_de",
    "rmse_on_de",
    "rwjs_nearest",
    "scfid",
    "scfid_by_condition",
    "share",
    "spearman",
    "spearman_brown",
    "spearman_on_de",
    "valid_output_rate",
    "verifier_de_spearman",
    "verifier_pathway",
    "verifier_pearson_de",
    "verifier_rmse_de",
]
