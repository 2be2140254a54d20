"""Evaluation of frozen encoders: feature extraction, weighted kNN, linear probe, plots.

The linear probe is imported from its module, ``from ssljax.eval.linear_probe import
linear_probe``: re-exporting the function here would hide the submodule of the same name.
"""

from ssljax.eval.features import extract_features
from ssljax.eval.knn import knn_accuracy, knn_predict
from ssljax.eval.plots import plot_training_curves, read_metrics

__all__ = [
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "plot_training_curves",
    "read_metrics",
]
