"""Gradient checking for any loss or op on any Keras backend.

``check_gradients(fn, x)`` compares the gradient that the backend's autodiff produces for ``fn`` (custom
gradients included) with float64 central finite differences, and reports the worst relative error and where it
occurred. Use it on your own custom losses too::

    from keras_stable_heads.testing import check_gradients
    result = check_gradients(lambda z: my_loss(labels, z), logits)
    print(result)   # or, in a test: if not result.ok: raise AssertionError(result)
"""

import dataclasses

import numpy as np
from keras import ops

from . import _backend


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """The outcome of :func:`check_gradients`.

    Attributes:
        ok: whether every checked entry is within ``atol + rtol * |numeric|``.
        max_error: the worst ``|analytic - numeric| / (atol + rtol * |numeric|)`` ratio (<= 1 passes).
        max_relative_error: the worst ``|analytic - numeric| / max(|numeric|, atol)``.
        where: the index (into ``x``, or the direction number for directional checks) of the worst entry.
        analytic, numeric: the two values there.
        mode: ``"elementwise"`` (every coordinate) or ``"directional"`` (random directions, for large inputs).
    """

    ok: bool
    max_error: float
    max_relative_error: float
    where: tuple
    analytic: float
    numeric: float
    mode: str

    def __str__(self):
        verdict = "passed" if self.ok else "FAILED"
        return (f"gradient check {verdict} ({self.mode}): worst relative error {self.max_relative_error:.3g} at "
                f"{self.where} (analytic {self.analytic:.9g}, numeric {self.numeric:.9g})")


def check_gradients(fn, x, *, rtol=1e-6, atol=1e-9, step=1e-6, max_elements=2048, directions=8, seed=0):
    """Check the gradient of ``fn`` at ``x`` against float64 central finite differences.

    ``fn`` maps one tensor to a tensor of any shape (close over labels and options). The checked scalar is
    ``sum(w * fn(x))`` with a fixed random cotangent ``w``, so every output entry is exercised. Inputs with up to
    ``max_elements`` entries are checked coordinate by coordinate; larger ones along ``directions`` random
    directions. Everything runs in float64 (JAX's x64 mode is enabled for the duration).

    Args:
        fn: the function to check; it must compute in the dtype it receives (float64 here).
        x: the point, array-like; converted to float64.
        rtol, atol: an entry passes when ``|analytic - numeric| <= atol + rtol * |numeric|``.
        step: finite-difference step relative to ``max(1, |x_i|)``.
        max_elements: the largest input checked coordinate by coordinate.
        directions: how many random directions for larger inputs.
        seed: seeds the cotangent and the directions.

    Returns:
        A :class:`GradientCheck`; ``str(result)`` is a one-line report.
    """
    rng = np.random.default_rng(seed)
    x = np.array(x, dtype=np.float64)
    with _backend.float64_scope():
        out_shape = np.shape(ops.convert_to_numpy(fn(ops.convert_to_tensor(x))))
        w = rng.uniform(0.5, 1.5, size=out_shape) * rng.choice([-1.0, 1.0], size=out_shape)
        w_tensor = ops.convert_to_tensor(w)

        def scalar(t):
            return ops.sum(ops.convert_to_tensor(w_tensor, dtype="float64") * ops.cast(fn(t), "float64"))

        def value(point):
            return float(ops.convert_to_numpy(scalar(ops.convert_to_tensor(point))))

        _, grad = _backend.value_and_grad(scalar, x)
        grad = np.asarray(grad, dtype=np.float64)
        if x.size <= max_elements:
            mode = "elementwise"
            probes = [np.eye(1, x.size, i).reshape(x.shape) for i in range(x.size)]
            steps = [step * max(1.0, abs(v)) for v in x.reshape(-1)]
        else:
            mode = "directional"
            probes = [d / np.linalg.norm(d) for d in rng.standard_normal((directions,) + x.shape)]
            steps = [step * max(1.0, float(np.max(np.abs(x))))] * directions
        numeric = np.array([(value(x + h * d) - value(x - h * d)) / (2.0 * h) for d, h in zip(probes, steps)])
    analytic = np.array([np.sum(grad * d) for d in probes])
    error = np.abs(analytic - numeric)
    ratio = error / (atol + rtol * np.abs(numeric))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    worst = int(np.argmax(ratio))
    where = np.unravel_index(worst, x.shape) if mode == "elementwise" else (worst,)
    return GradientCheck(
        ok=bool(np.all(ratio <= 1.0)),
        max_error=float(ratio[worst]),
        max_relative_error=float(np.max(error / np.maximum(np.abs(numeric), atol))),
        where=tuple(int(i) for i in where),
        analytic=float(analytic[worst]),
        numeric=float(numeric[worst]),
        mode=mode,
    )
