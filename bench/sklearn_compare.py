"""gpu_mlp's scikit-learn estimators against scikit-learn's own MLPs: score and fit time.

Both fit with the same hyperparameters (scikit-learn's defaults: adam, 100 hidden ReLU
units, 200 iterations at most) on the built-in digits (accuracy) and the synthetic
regression set (R^2), for a few random_state seeds; the median fit time of each is
printed beside the mean score, as a Markdown table.

    python bench/sklearn_compare.py          # needs scikit-learn
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier as TheirClassifier
from sklearn.neural_network import MLPRegressor as TheirRegressor

from gpu_mlp import datasets
from gpu_mlp.sklearn import MLPClassifier, MLPRegressor

SEEDS = (0, 1, 2)


def problems():
    X, y = datasets.digits()
    yield "digits (accuracy)", datasets.train_test_split(X, y, 0.2, 0), MLPClassifier, \
        TheirClassifier
    X, Y = datasets.regression()
    yield "regression (R^2)", datasets.train_test_split(X, Y[:, 0], 0.2, 0), MLPRegressor, \
        TheirRegressor


def measure(make, split):
    X_train, X_test, y_train, y_test = split
    scores, seconds = [], []
    for seed in SEEDS:
        model = make(random_state=seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_train, y_train)
        seconds.append(time.perf_counter() - start)
        scores.append(model.score(X_test, y_test))
    return float(np.mean(scores)), float(np.median(seconds))


def main() -> None:
    print("| problem | gpu_mlp score | scikit-learn score | gpu_mlp fit s | scikit-learn fit s |")
    print("| --- | --- | --- | --- | --- |")
    for name, split, ours, theirs in problems():
        (our_score, our_s), (their_score, their_s) = measure(ours, split), measure(theirs, split)
        print(f"| {name} | {our_score:.4f} | {their_score:.4f} | {our_s:.2f} | {their_s:.2f} |")


if __name__ == "__main__":
    # (no options: --help says what it does, and runs nothing)
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
