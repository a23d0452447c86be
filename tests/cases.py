"""The table of ops under test: our function, its float64 reference, an input generator and option sets.

Shared by the reference, gradient, extreme-input and peer tests so every op is covered the same way.
"""

import dataclasses

import numpy as np
import reference as ref

from keras_stable_heads import ops


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: object
    reference: object
    make: object  # make(rng, rows, width) -> (prediction, labels)
    options: tuple  # option dicts, each tested


def _dense_labels(rng, rows, width):
    z = rng.normal(0, 3, (rows, width))
    hard = np.eye(width)[rng.integers(0, width, rows)]
    soft = rng.dirichlet(np.ones(width), rows)
    return z, np.where(rng.random((rows, 1)) < 0.5, hard, soft)


def _integer_labels(rng, rows, width):
    return rng.normal(0, 3, (rows, width)), rng.integers(0, width, rows)


def _binary_labels(rng, rows, width):
    z = rng.normal(0, 3, (rows, width))
    return z, np.where(rng.random((rows, width)) < 0.5, rng.integers(0, 2, (rows, width)), rng.random((rows, width)))


def _multilabel_labels(rng, rows, width):
    z = rng.normal(0, 3, (rows, width))
    y = rng.integers(0, 2, (rows, width)).astype(float)
    return z, np.where(rng.random((rows, width)) < 0.2, -1.0, y)


def _location_scale(rng, rows, width):
    dim = max(width // 2, 1)
    params = np.concatenate([rng.normal(0, 2, (rows, dim)), rng.normal(0, 0.5, (rows, dim))], axis=-1)
    return params, rng.normal(0, 2, (rows, dim))


def _weights(width):
    return list(np.linspace(0.5, 2.0, width))


CASES = [
    Case("softmax_ce", ops.softmax_cross_entropy, ref.softmax_ce, _dense_labels, (
        {}, {"label_smoothing": 0.1}, {"class_weight": "w"}, {"z_loss": 1e-3}, {"logit_softcap": 5.0},
        {"label_smoothing": 0.2, "class_weight": "w", "z_loss": 1e-2, "logit_softcap": 4.0},
    )),
    Case("sparse_softmax_ce", ops.softmax_cross_entropy_with_integer_labels, ref.sparse_softmax_ce, _integer_labels, (
        {}, {"label_smoothing": 0.1}, {"class_weight": "w"}, {"z_loss": 1e-3}, {"logit_softcap": 5.0},
        {"label_smoothing": 0.2, "class_weight": "w", "z_loss": 1e-2, "logit_softcap": 4.0},
    )),
    Case("binary_ce", ops.sigmoid_binary_cross_entropy, ref.binary_ce, _binary_labels, (
        {}, {"pos_weight": 3.0}, {"pos_weight": "w"}, {"label_smoothing": 0.1}, {"pos_weight": 2.0, "label_smoothing": 0.2},
    )),
    Case("multilabel_ce", ops.sigmoid_multilabel_cross_entropy, ref.multilabel_ce, _multilabel_labels, (
        {"missing_label": -1.0}, {"missing_label": -1.0, "label_reduction": "sum"},
        {"missing_label": -1.0, "pos_weight": "w", "label_smoothing": 0.1},
    )),
    Case("binary_focal_ce", ops.sigmoid_focal_cross_entropy, ref.binary_focal_ce, _binary_labels, (
        {}, {"gamma": 0.5}, {"gamma": 3.0, "alpha": 0.25}, {"gamma": 2.0, "label_smoothing": 0.1},
    )),
    Case("softmax_focal_ce", ops.softmax_focal_cross_entropy, ref.softmax_focal_ce, _dense_labels, (
        {}, {"gamma": 0.5}, {"gamma": 3.0, "alpha": 0.25}, {"gamma": 2.0, "label_smoothing": 0.1},
    )),
    Case("gaussian_nll", ops.gaussian_nll, ref.gaussian_nll, _location_scale, ({}, {"full": True})),
    Case("laplace_nll", ops.laplace_nll, ref.laplace_nll, _location_scale, ({}, {"full": True})),
]


def resolve(options, width):
    """Replace the placeholder "w" with a per-class weight vector of the right width."""
    return {k: (_weights(width) if v == "w" else v) for k, v in options.items()}


def all_cases():
    for case in CASES:
        for i, options in enumerate(case.options):
            yield case, options, f"{case.name}-{i}"
