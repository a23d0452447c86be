"""The table of ops under test: our function, its float64 reference, an input generator and option sets.

Shared by the reference, gradient, extreme-input and peer tests so every op is covered the same way.
"""

import dataclasses

import numpy as np
from keras_stable_heads import reference as ref

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


# ---------------------------------------------------------------------------------------------------------------
# Kernel tests: tests/test_kernels_cpu.py (Numba CPU) and tests/test_kernels_cuda.py (Numba CUDA, on the simulator
# without a GPU) share one runner over the kernel pairs of keras_stable_heads._kernel_ops (the pairs the bridges
# call), the option tables, float64 closed forms and the checks below; each file picks its shapes.
# ---------------------------------------------------------------------------------------------------------------

f32 = np.float32


class Kernels:
    """Runs kernel pairs on NumPy arrays. ``make_pair(op, num_classes, options)`` returns a KernelPair whose
    ``forward(z, y, loss, saved)`` and ``backward(z, y, saved, dloss, grad)`` take NumPy arrays (a CUDA pair with
    its stream bound). Every output buffer starts filled with 7, so an entry a kernel forgets to write shows."""

    def __init__(self, make_pair):
        self.make_pair = make_pair

    def run(self, op, z, y, options=None, dloss=None, dtype=f32):
        """(loss [N], saved [N, width], grad like z) of ``op`` on logits z and labels y."""
        z = np.ascontiguousarray(z, dtype)
        n, c = z.shape
        pair = self.make_pair(op, c, options or {})
        y = np.ascontiguousarray(y, np.int32 if pair.label_dtype == "int32" else f32)
        dloss = np.ones(n, f32) if dloss is None else np.ascontiguousarray(dloss, f32)
        loss, saved = np.full(n, 7.0, f32), np.full((n, pair.saved_width), 7.0, f32)
        grad = np.full(z.shape, 7.0, dtype)
        pair.forward(z, y, loss, saved)
        pair.backward(z, y, saved, dloss, grad)
        return loss, saved, grad

    def sparse(self, z, y, w=None, eps=0.0, zl=0.0, cap=0.0, ignore=None, dloss=None, dtype=f32):
        """Sparse softmax CE: (loss, lse, grad)."""
        options = dict(class_weight=w, label_smoothing=eps, z_loss=zl, logit_softcap=cap or None, ignore_class=ignore)
        loss, saved, grad = self.run("sparse_softmax_ce", z, y, options, dloss, dtype)
        return loss, lse_of(saved), grad

    def dense(self, z, y, w=None, eps=0.0, zl=0.0, cap=0.0, dloss=None):
        """Dense softmax CE: (loss, lse, grad)."""
        options = dict(class_weight=w, label_smoothing=eps, z_loss=zl, logit_softcap=cap or None)
        loss, saved, grad = self.run("softmax_ce", z, y, options, dloss)
        return loss, lse_of(saved), grad

    def sigmoid(self, z, y, pw=None, eps=0.0, missing=None, mean=True, dloss=None):
        """Sigmoid CE: (loss, grad)."""
        options = dict(pos_weight=pw, label_smoothing=eps, missing_label=missing,
                       label_reduction="mean" if mean else "sum")
        loss, _, grad = self.run("sigmoid_ce", z, y, options, dloss)
        return loss, grad


def lse_of(saved):
    """The log-sum-exp from a softmax forward's saved values: the CPU keeps lse, CUDA (shift, log_sum, W)."""
    return saved[:, 0] if saved.shape[1] == 1 else saved[:, 0] + saved[:, 1]


# Softmax CE options: (label_smoothing, class weights?, z_loss, softcap)
SOFTMAX_OPTIONS = [
    (0.0, False, 0.0, 0.0),
    (0.1, False, 0.0, 0.0),
    (0.0, True, 0.0, 0.0),
    (0.0, False, 1e-3, 0.0),
    (0.0, False, 0.0, 5.0),
    (0.2, True, 1e-3, 0.0),
    (0.1, True, 1e-3, 5.0),
    (0.1, False, 0.0, 30.0),
]

FOCAL_OPTIONS = [  # gamma's integer part is taken by multiplication and a fraction by exp/log: both, and > 7
    {}, {"gamma": 0.5}, {"gamma": 3.0, "alpha": 0.25}, {"gamma": 2.0, "label_smoothing": 0.1}, {"gamma": 0.0},
    {"gamma": 2.5, "alpha": 0.75, "label_smoothing": 0.05}, {"gamma": 9.0},
]


def opts_id(o):
    if isinstance(o, dict):
        return "-".join(f"{k}{v}" for k, v in o.items()) or "defaults"
    return f"eps{o[0]}-w{int(o[1])}-zl{o[2]}-cap{o[3]}"


def shape_id(s):
    return "x".join(str(d) for d in s)


def softmax_grad_closed_form(z, ybar, w, zl, cap, dloss):
    """float64: dloss * softcap'(z) * (p (W + 2 zl lse) - w ybar), p from exp(z' - max) / sum (at |z| ~ 1e30
    even float64 lse = max + log(sum) rounds log(sum) away)."""
    zp = ref.softcap(z, cap or None)
    _, lse = ref.log_softmax(zp)
    m = np.max(zp, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore"):
        e = np.exp(zp - m)
        p = e / np.sum(e, axis=-1, keepdims=True)
        slope = np.where(np.isneginf(zp), 0.0, 1.0 - (zp / cap) ** 2) if cap else 1.0  # 0 at a masked class
    w = np.asarray(w, np.float64)
    big_w = np.sum(w * ybar, axis=-1, keepdims=True)
    return np.asarray(dloss, np.float64)[:, None] * slope * (p * (big_w + 2.0 * zl * lse[:, None]) - w * ybar)


def sparse_ybar(y, c, eps):
    return (1.0 - eps) * np.eye(c)[y] + eps / c


def sigmoid_grad_closed_form(z, y, pw, eps, present, mean, dloss):
    """float64: (1 - ybar) s(z) - pw ybar s(-z), 0 where not present, times dloss (/ count for a mean)."""
    z = np.asarray(z, np.float64)
    ybar = (1.0 - eps) * np.asarray(y, np.float64) + 0.5 * eps
    with np.errstate(over="ignore"):
        g = (1.0 - ybar) / (1.0 + np.exp(-z)) - np.asarray(pw, np.float64) * ybar / (1.0 + np.exp(z))
    g = np.where(present, g, 0.0)
    scale = np.asarray(dloss, np.float64)
    if mean:
        count = present.sum(-1)
        scale = np.where(count > 0, scale / np.maximum(count, 1), 0.0)
    return scale[:, None] * g


def softmax_focal_grad_closed_form(z, target, gamma, alpha):
    """float64 gradient of ref.softmax_focal_ce for rows where finite differences cannot work (+-1e30 logits, ties
    at the max): alpha (t h - p sum t h), h = (1-p)^gamma (gamma p log p / (1-p) - 1), p from exp(z - max) / sum."""
    z = np.asarray(z, np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.exp(z - m)
        s = np.sum(e, axis=-1, keepdims=True)
        p = e / s
        log_p = (z - m) - np.log(s)
        omp = -np.expm1(log_p)
        ratio = np.where(log_p == 0, -1.0, np.where(p == 0, 0.0, p * log_p / omp))
        h = omp ** gamma * (gamma * ratio - 1.0)
    th = np.where(target == 0, 0.0, target * h)
    return (1.0 if alpha is None else alpha) * (th - p * np.sum(th, axis=-1, keepdims=True))


def dense_labels(rng, n, c):
    """Probability vectors with zero target mass on about half of the classes."""
    y = rng.random((n, c))
    y[y < 0.5] = 0.0
    y[:, 0] += 0.1
    return (y / y.sum(-1, keepdims=True)).astype(f32)


def sample_rows(n):
    """Rows to check by finite differences in a large batch: the ends, block edges of both layouts, the middle."""
    return sorted({r for r in (0, 1, 63, 64, 340, 341, 1023, 1024, n // 2, n - 2, n - 1) if 0 <= r < n})


def assert_grad_rows(grad, reference, z, y, dloss, rows, rtol=1e-4, atol=1e-6, **options):
    """The kernel's gradient on ``rows`` equals float64 central differences of ``reference`` there, each row
    differentiated on its own (in a sum over rows a loss of 1e4 would swamp a derivative of 1e-26)."""
    want = np.stack([ref.numeric_grad(lambda x: reference(x, y[r:r + 1], **options), z[r:r + 1], dloss[r:r + 1])[0]
                     for r in rows])
    np.testing.assert_allclose(grad[rows], want, rtol=rtol, atol=atol)


# --- softmax cross-entropy -------------------------------------------------------------------------------------


def check_softmax_matches_reference(k, shape, opts, sparse):
    """Loss, log-sum-exp and gradient of the sparse (integer labels, the last row's at the last class) or dense
    (probability vectors) softmax CE kernels against the float64 reference and closed form."""
    eps, weighted, zl, cap = opts
    n, c = shape
    rng = np.random.default_rng(n * (1000 if sparse else 7) + c)
    z = (rng.standard_normal(shape) * 4.0).astype(f32)
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    if sparse:
        y = rng.integers(0, c, n)
        y[-1] = c - 1
        ybar = sparse_ybar(y, c, eps)
    else:
        y = dense_labels(rng, n, c)
        ybar = (1.0 - eps) * y.astype(np.float64) + eps / c
    dloss = rng.standard_normal(n).astype(f32)
    options = dict(label_smoothing=eps, class_weight=w, z_loss=zl, logit_softcap=cap or None)
    loss, lse, grad = (k.sparse if sparse else k.dense)(z, y, w, eps, zl, cap, dloss=dloss)
    want = (ref.sparse_softmax_ce if sparse else ref.softmax_ce)(z, y, **options)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref.log_softmax(ref.softcap(z, cap or None))[1], rtol=1e-6, atol=1e-6)
    want_grad = softmax_grad_closed_form(z, ybar, np.ones(c) if w is None else w, zl, cap, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)


def check_sparse_grad_finite_differences(k, shape, opts):
    eps, weighted, zl, cap = opts
    n, c = shape
    rng = np.random.default_rng(c)
    z = (rng.standard_normal(shape) * 2.0).astype(f32)
    y = rng.integers(0, c, n)
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    _, _, grad = k.sparse(z, y, w, eps, zl, cap, dloss=dloss)
    numeric = ref.numeric_grad(
        lambda x: ref.sparse_softmax_ce(x, y, label_smoothing=eps, class_weight=w, z_loss=zl,
                                        logit_softcap=cap or None), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


def extreme_rows(seed, c):
    """A random row of C logits, the same with its odd classes masked (-inf), and with a NaN in the middle."""
    base = np.random.default_rng(seed).standard_normal(c).astype(f32)
    masked = base.copy()
    masked[1::2] = -np.inf
    nan_row = base.copy()
    nan_row[c // 2] = np.nan
    return base, masked, nan_row


def check_sparse_extreme_inputs(k, c):
    """One row per case, all in one batch, so a bad row cannot leak into its neighbours."""
    base, masked, nan_row = extreme_rows(7 + c, c)
    cases = [
        (base * 1e4, int(np.argmax(base))),         # 0: +-1e4, label at the max: loss ~ 0
        (base * 1e4, int(np.argmin(base))),         # 1: +-1e4, label at the min: loss ~ 2e4
        (np.where(base > 0, 1e30, -1e30), 0),       # 2: +-1e30
        (masked, 0),                                # 3: -inf masks odd classes
        (np.full(c, -np.inf), 0),                   # 4: all -inf
        (nan_row, 0),                               # 5: NaN in
        (base, c - 1),                              # 6: label at the last class
        (base, -1),                                 # 7: out of range (low)
        (base, c),                                  # 8: out of range (high)
        (base + 1e4, 0),                            # 9: a common offset of 1e4 (|lse| large, spread small)
        (base, 0),                                  # 10: a normal row after the bad ones
    ]
    z = np.stack([np.asarray(r, f32) for r, _ in cases])
    y = np.array([label for _, label in cases])
    loss, lse, grad = k.sparse(z, y)
    safe_y = np.clip(y, 0, c - 1)
    want = ref.sparse_softmax_ce(z, safe_y)
    good = [0, 1, 2, 3, 6, 9, 10]
    # +-1e30: the float64 reference absorbs log(#classes at the max) into 1e30; the kernel keeps it (exact value)
    top = int(np.sum(z[2] == z[2].max()))
    want[2] = np.log(top) + (float(z[2].max()) - float(z[2, 0]))
    np.testing.assert_allclose(loss[good], want[good], rtol=1e-5, atol=5e-3)
    assert np.all(np.isfinite(loss[good])) and np.all(np.isfinite(grad[good]))
    assert 0.0 <= loss[0] <= 1e-3  # confident row at 1e4: the loss is ~0 with no cancellation
    assert np.all(grad[3, 1::2] == 0.0)  # masked classes: exactly zero gradient
    assert lse[4] == -np.inf and loss[4] == np.inf and np.all(grad[4] == 0.0)
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))  # NaN in -> NaN out, for that row only
    assert np.all(np.isnan(loss[7:9])) and np.all(np.isnan(grad[7:9]))
    # p exact to float32 rounding at |lse| = 1e4 and 1e30 (where 1e30 + log 2 rounds to 1e30)
    want_grad = softmax_grad_closed_form(z[good], sparse_ybar(safe_y[good], c, 0.0), np.ones(c), 0.0, 0.0,
                                         np.ones(len(good)))
    np.testing.assert_allclose(grad[good], want_grad, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(grad[good].sum(-1), 0.0, atol=1e-5)  # softmax minus one-hot


def check_sparse_masked_classes_with_options(k, c, opts):
    """-inf classes with every option: softcap keeps them masked (grad exactly 0); with label smoothing the loss
    is +inf (the smoothed target puts mass on a class of probability 0), as in the reference."""
    eps, weighted, zl, cap = opts
    rng = np.random.default_rng(c)
    z = rng.standard_normal((4, c)).astype(f32)
    z[:, 1::3] = -np.inf
    y = np.array([0, 2 % c, 0, c - 1 if (c - 1) % 3 != 1 else 0])
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    loss, _, grad = k.sparse(z, y, w, eps, zl, cap)
    want = ref.sparse_softmax_ce(z, y, label_smoothing=eps, class_weight=w, z_loss=zl, logit_softcap=cap or None)
    if eps > 0:
        assert np.all(loss == np.inf) and np.all(want == np.inf)
    else:
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    if cap > 0 or eps == 0:
        assert np.all(grad[:, 1::3] == 0.0)
    assert np.all(np.isfinite(grad))


def check_zero_weight_on_masked_classes(k, c, sparse):
    """A class of weight 0 whose logit is -inf (a padding class) adds nothing: no 0 * inf = NaN in the loss, also
    with label smoothing and when it is the label itself (its term is skipped: loss 0 and zero gradient).
    Gradient against p W - w ybar in float64 (W = sum_c w_c ybar_c)."""
    rng = np.random.default_rng(c)
    z = rng.standard_normal((4, c)).astype(f32)
    z[:, 1::3] = -np.inf
    w = (rng.random(c) + 0.5).astype(f32)
    w[1::3] = 0.0
    y = np.array([0, 1, 2 % c, 1])
    for eps in (0.0, 0.1):
        labels = y if sparse else np.eye(c, dtype=f32)[y]
        loss, _, grad = (k.sparse if sparse else k.dense)(z, labels, w, eps)
        want = ref.sparse_softmax_ce(z, y, label_smoothing=eps, class_weight=w)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(loss)) and not np.any(np.isnan(grad))
        p = np.exp(z.astype(np.float64) - np.max(z, -1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        target = w * ((1.0 - eps) * np.eye(c)[y] + eps / c)
        np.testing.assert_allclose(grad, p * target.sum(-1, keepdims=True) - target, rtol=1e-5, atol=1e-6)
        assert np.all(grad[:, 1::3] == 0.0)


def check_softcap_slope_far_out(k, c):
    """The softcap's slope 1 - tanh^2 where tanh is near 1 (|z| > ~5 cap), against float64: computed as 1 - t * t
    it was 6% off at 8 cap and 0 from 9 cap; each gradient here is slope * p, with p ~ 1."""
    cap = 30.0
    big = np.array([90.0, 150.0, 240.0, 270.0, 300.0])
    z = np.full((len(big), c), -np.inf, f32)
    z[:, 0] = 0.0
    z[:, 1] = big
    _, _, grad = k.sparse(z, np.zeros(len(big), np.int64), cap=cap)
    zc = cap * np.tanh(z.astype(np.float64) / cap)
    p = np.exp(zc - zc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    slope = 1.0 / np.cosh(big / cap) ** 2
    np.testing.assert_allclose(grad[:, 1], slope * p[:, 1], rtol=2e-5)
    assert np.all(grad[:, 2:] == 0.0)


def check_sparse_bad_label_on_all_masked_row(k, c):
    """A bad label gives NaN (loss and gradient) whatever the logits, also on a row of all -inf (which alone
    gives loss +inf and a zero gradient); an ignored label gives 0 there too."""
    z = np.zeros((3, c), f32)
    z[:2] = -np.inf
    loss, _, grad = k.sparse(z, np.array([c, -100, 0]), ignore=-100)
    assert np.isnan(loss[0]) and np.all(np.isnan(grad[0]))
    assert loss[1] == 0.0 and np.all(grad[1] == 0.0)
    loss, _, grad = k.sparse(z[:1], np.array([0]))
    assert loss[0] == np.inf and np.all(grad[0] == 0.0)


def check_sparse_ignore_class(k, c, n):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((n, c)).astype(f32)
    y = rng.integers(0, c, n)
    y[::3] = -100
    y[1] = c  # out of range and not ignored
    loss, lse, grad = k.sparse(z, y, eps=0.1, zl=1e-3, ignore=-100)
    ignored = y == -100
    assert np.all(loss[ignored] == 0.0) and np.all(lse[ignored] == 0.0) and np.all(grad[ignored] == 0.0)
    assert np.isnan(loss[1]) and np.all(np.isnan(grad[1]))
    keep = ~ignored & (y < c)
    np.testing.assert_allclose(loss[keep], ref.sparse_softmax_ce(z[keep], y[keep], label_smoothing=0.1, z_loss=1e-3),
                               rtol=1e-5, atol=1e-6)
    want_grad = softmax_grad_closed_form(z[keep], sparse_ybar(y[keep], c, 0.1), np.ones(c), 1e-3, 0.0,
                                         np.ones(keep.sum()))
    np.testing.assert_allclose(grad[keep], want_grad, rtol=1e-5, atol=2e-6)
    # an ignore_class that is a valid class id drops exactly those rows
    loss2, _, grad2 = k.sparse(z, np.where(ignored, 0, np.minimum(y, c - 1)), ignore=0)
    assert np.all(loss2[ignored] == 0.0) and np.all(grad2[ignored] == 0.0)


def check_sparse_one_class(k):
    z = np.array([[3.0], [-1e30], [-np.inf], [0.0]], f32)
    loss, lse, grad = k.sparse(z, [0, 0, 0, 0])
    np.testing.assert_array_equal(loss[[0, 1, 3]], 0.0)
    assert loss[2] == np.inf and lse[2] == -np.inf
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_allclose(lse[[0, 1, 3]], [3.0, -1e30, 0.0])


def check_dense_grad_finite_differences(k, shape, opts):
    eps, weighted, zl, cap = opts
    n, c = shape
    rng = np.random.default_rng(5)
    z = rng.standard_normal(shape).astype(f32)
    y = dense_labels(rng, n, c)
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    _, _, grad = k.dense(z, y, w, eps, zl, cap, dloss=dloss)
    numeric = ref.numeric_grad(lambda x: ref.softmax_ce(x, y, label_smoothing=eps, class_weight=w, z_loss=zl,
                                                        logit_softcap=cap or None), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


def check_dense_equals_sparse_for_one_hot(k, c, n):
    rng = np.random.default_rng(c)
    z = (rng.standard_normal((n, c)) * 3.0).astype(f32)
    y = rng.integers(0, c, n)
    w = (rng.random(c) + 0.5).astype(f32)
    dloss = rng.random(n).astype(f32)
    ls, es, gs = k.sparse(z, y, w, 0.1, 1e-3, 5.0, dloss=dloss)
    ld, ed, gd = k.dense(z, np.eye(c, dtype=f32)[y], w, 0.1, 1e-3, 5.0, dloss=dloss)
    np.testing.assert_allclose(ld, ls, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ed, es, rtol=1e-6)
    np.testing.assert_allclose(gd, gs, rtol=1e-5, atol=1e-7)


def check_dense_extreme_inputs(k, c):
    rng = np.random.default_rng(c)
    base = rng.standard_normal(c).astype(f32)
    z = np.stack([base * 1e4, np.where(base > 0, 1e30, -1e30), base, base, np.full(c, -np.inf), base,
                  base - 1e4]).astype(f32)
    z[2, 1::2] = -np.inf  # masked classes with zero target mass: finite loss
    z[3, 1] = -np.inf     # masked class with target mass: +inf
    z[5, 2] = np.nan
    y = np.zeros((7, c), f32)
    y[:, 0] = 0.7
    y[:, -1 if c % 2 == 1 else -2] += 0.3  # an even class, not masked in row 2
    y[3, 1] = 0.2
    loss, lse, grad = k.dense(z, y)
    want = ref.softmax_ce(z, y)
    top = z[1].max()  # +-1e30: the exact value (the float64 reference rounds log(#max) away against 1e30)
    want[1] = np.sum(y[1] * ((np.float64(top) - z[1]) + np.log(np.sum(z[1] == top))))
    rows = [0, 1, 2, 6]
    np.testing.assert_allclose(loss[rows], want[rows], rtol=1e-5)
    assert np.all(grad[2, 1::2] == 0.0) and np.all(np.isfinite(grad[rows]))
    assert loss[3] == np.inf == want[3]
    assert loss[4] == np.inf and lse[4] == -np.inf and np.all(grad[4] == 0.0)
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))
    want_grad = softmax_grad_closed_form(z[rows], y[rows].astype(np.float64), np.ones(c), 0.0, 0.0, np.ones(4))
    np.testing.assert_allclose(grad[rows], want_grad, rtol=1e-5, atol=2e-6)


# --- sigmoid cross-entropy -------------------------------------------------------------------------------------


def check_sigmoid_matches_reference(k, shape, eps, weighted, missing, mean):
    n, c = shape
    rng = np.random.default_rng(n + c)
    z = (rng.standard_normal(shape) * 4.0).astype(f32)
    y = rng.integers(0, 2, shape).astype(f32)
    y[0, 0] = 0.3  # soft label
    if missing is not None:
        y[rng.random(shape) < 0.3] = missing
        y[-1] = missing  # a row with nothing present
    pw = (rng.random(c) * 3.0 + 0.2).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    loss, grad = k.sigmoid(z, y, pw, eps, missing, mean, dloss=dloss)
    want = ref.multilabel_ce(z, y, pos_weight=1.0 if pw is None else pw, label_smoothing=eps,
                             missing_label=missing, label_reduction="mean" if mean else "sum")
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    present = np.ones(shape, bool) if missing is None else y != missing
    want_grad = sigmoid_grad_closed_form(z, np.where(present, y, 0.0), np.ones(c) if pw is None else pw, eps,
                                         present, mean, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    if missing is not None:
        assert loss[-1] == 0.0 and np.all(grad[-1] == 0.0) and np.all(grad[~present] == 0.0)


def check_sigmoid_binary_ce_and_finite_differences(k, c):
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((3, c)) * 3.0).astype(f32)
    y = rng.integers(0, 2, (3, c)).astype(f32)
    pw = (rng.random(c) + 0.5).astype(f32)
    dloss = rng.standard_normal(3).astype(f32)
    loss, grad = k.sigmoid(z, y, pw, 0.1, None, True, dloss=dloss)
    np.testing.assert_allclose(loss, ref.binary_ce(z, y, pos_weight=pw, label_smoothing=0.1), rtol=1e-5)
    numeric = ref.numeric_grad(lambda x: ref.binary_ce(x, y, pos_weight=pw, label_smoothing=0.1), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def check_sigmoid_extreme_inputs(k):
    z = np.array([[-30.0, 30.0, 1e4, -1e4, 1e30, -1e30, np.nan, 0.0]], f32)
    y = np.array([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]], f32)
    loss, grad = k.sigmoid(z, y, mean=False)
    assert np.isnan(loss[0]) and np.isnan(grad[0, 6])
    np.testing.assert_allclose(grad[0, :6], [-1.0, 1.0, 0.0, 0.0, 1.0, -1.0], atol=1e-12)
    assert grad[0, 7] == np.float32(-0.5)
    # the same entries without the NaN: a finite sum equal to the reference (30 + 30 + 0 + 0 + 1e30 + 1e30)
    loss2, _ = k.sigmoid(z[:, :6], y[:, :6], mean=False)
    np.testing.assert_allclose(loss2, ref.sigmoid_bce_elementwise(z[:, :6], y[:, :6]).sum(-1), rtol=1e-6)
    l30, g30 = k.sigmoid([[-30.0]], [[1.0]])
    np.testing.assert_allclose(l30, 30.0, rtol=1e-7)
    assert g30[0, 0] == -1.0
    # a NaN logit in a missing entry is dropped with it
    loss3, grad3 = k.sigmoid(z, np.where(np.isnan(z), -1.0, y), missing=-1.0, mean=True)
    assert np.isfinite(loss3[0]) and grad3[0, 6] == 0.0
    # infinite logits on the side of their label: loss 0 (no 0 * inf), gradient 0; on the other side +inf and -1/1
    zi = np.array([[np.inf, -np.inf], [-np.inf, np.inf]], f32)
    yi = np.array([[1.0, 0.0], [1.0, 0.0]], f32)
    loss4, grad4 = k.sigmoid(zi, yi, mean=False)
    assert loss4[0] == 0.0 and np.all(grad4[0] == 0.0)
    assert loss4[1] == np.inf and np.array_equal(grad4[1], [-1.0, 1.0])


def check_sigmoid_gradient_exact_for_confident_logits(k):
    """(1 - y) s(z) - pw y s(-z), not s(z) (pw y + 1 - y) - pw y: the latter rounds s(z) - 1 to 0 past z ~ 16.6 in
    float32, the true gradient -e^-z is tiny but not 0 (2.06e-9 at z = 20)."""
    z = np.array([[20.0, -20.0, 40.0, -40.0, 16.0, 80.0]], f32)
    y = np.array([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]], f32)
    pw = np.array([1.0, 1.0, 3.0, 1.0, 0.5, 1.0], f32)
    _, grad = k.sigmoid(z, y, pw=pw, mean=False)
    want = [-np.exp(-20.0), np.exp(-20.0), -3.0 * np.exp(-40.0), np.exp(-40.0), -0.5 / (1.0 + np.exp(16.0)),
            -np.exp(-80.0)]
    np.testing.assert_allclose(grad[0], want, rtol=1e-5, atol=0.0)


# --- focal cross-entropy ---------------------------------------------------------------------------------------


def focal_kernel_options(options):
    """The focal ops' defaults made explicit (gamma 2, no alpha, no smoothing)."""
    return {"gamma": 2.0, "alpha": None, "label_smoothing": 0.0, **options}


def check_sigmoid_focal_matches_reference(k, shape, options, rows=None):
    n, c = shape
    rng = np.random.default_rng(n + 3 * c)
    z, y = (a.astype(f32) for a in _binary_labels(rng, n, c))
    dloss = rng.uniform(0.5, 1.5, n).astype(f32)
    loss, _, grad = k.run("sigmoid_focal_ce", z, y, focal_kernel_options(options), dloss)
    np.testing.assert_allclose(loss, ref.binary_focal_ce(z, y, **options), rtol=2e-5, atol=1e-7)
    rows = list(range(n)) if rows is None else rows
    assert_grad_rows(grad, ref.binary_focal_ce, z, y, dloss, rows, **options)


def check_softmax_focal_matches_reference(k, shape, options, rows=None):
    n, c = shape
    rng = np.random.default_rng(n + 5 * c)
    z, y = (a.astype(f32) for a in _dense_labels(rng, n, c))
    y[-1] = np.eye(c)[c - 1]  # label at the last class
    dloss = rng.uniform(0.5, 1.5, n).astype(f32)
    loss, saved, grad = k.run("softmax_focal_ce", z, y, focal_kernel_options(options), dloss)
    np.testing.assert_allclose(loss, ref.softmax_focal_ce(z, y, **options), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(saved[:, 0] + saved[:, 1], ref.log_softmax(z)[1], rtol=1e-6, atol=1e-6)
    rows = list(range(n)) if rows is None else rows
    assert_grad_rows(grad, ref.softmax_focal_ce, z, y, dloss, rows, **options)


def check_focal_at_gamma_zero_equals_cross_entropy(k, shape):
    """gamma = 0 without alpha is the cross-entropy: the focal kernels equal the CE kernels (loss and gradient)."""
    n, c = shape
    rng = np.random.default_rng(c)
    z = (rng.standard_normal(shape) * 5.0).astype(f32)
    z[0, 0] = 20.0  # a confident logit: both gradients in the exact form
    yb = rng.integers(0, 2, shape).astype(f32)
    yb[0, 0] = 1.0
    yd = dense_labels(rng, n, c)
    dloss = rng.uniform(0.5, 1.5, n).astype(f32)
    options = {"gamma": 0.0, "alpha": None, "label_smoothing": 0.1}
    focal, _, focal_grad = k.run("sigmoid_focal_ce", z, yb, options, dloss)
    ce, ce_grad = k.sigmoid(z, yb, eps=0.1, dloss=dloss)
    np.testing.assert_allclose(focal, ce, rtol=1e-6)
    np.testing.assert_allclose(focal_grad, ce_grad, rtol=1e-5, atol=1e-12)
    focal, _, focal_grad = k.run("softmax_focal_ce", z, yd, options, dloss)
    ce, _, ce_grad = k.dense(z, yd, eps=0.1, dloss=dloss)
    np.testing.assert_allclose(focal, ce, rtol=1e-5)
    np.testing.assert_allclose(focal_grad, ce_grad, rtol=1e-5, atol=1e-7)


SIGMOID_FOCAL_EXTREMES = [  # (logit, label): one entry per row
    (-30.0, 1.0), (30.0, 0.0), (-1e4, 1.0), (1e4, 0.0), (-1e30, 1.0), (1e30, 0.0),  # confidently wrong: loss ~ |z|
    (20.0, 1.0), (-20.0, 0.0), (12.0, 1.0), (1e4, 1.0), (-1e30, 0.0),  # confidently right: tiny or 0
    (np.inf, 1.0), (-np.inf, 0.0),  # right at infinity: loss 0, gradient 0
    (np.inf, 0.0), (-np.inf, 1.0),  # wrong at infinity: loss +inf
    (np.nan, 1.0), (0.0, 0.3), (3.0, 0.7),
]


def check_sigmoid_focal_extreme_inputs(k, options):
    z = np.array([[v] for v, _ in SIGMOID_FOCAL_EXTREMES], f32)
    y = np.array([[v] for _, v in SIGMOID_FOCAL_EXTREMES], f32)
    loss, _, grad = k.run("sigmoid_focal_ce", z, y, focal_kernel_options(options))
    finite = [i for i, (v, _) in enumerate(SIGMOID_FOCAL_EXTREMES) if np.isfinite(v)]
    np.testing.assert_allclose(loss[finite], ref.binary_focal_ce(z[finite], y[finite], **options), rtol=2e-5,
                               atol=1e-38)
    # confidently wrong: the loss grows with |z| and the gradient is -1 or 1 (times alpha_t), never saturating
    alpha = options.get("alpha")
    at = np.array([1.0 if alpha is None else (alpha if v else 1.0 - alpha) for _, v in SIGMOID_FOCAL_EXTREMES[:6]])
    np.testing.assert_allclose(grad[:6, 0], at * np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]), rtol=1e-6)
    # everywhere finite (the +-1e30 rows too, where the step of finite differences would be 1e24): the gradient
    # against float64 central differences; tiny gradients (-6e-27 at z = 20) to rtol, not hidden by an atol
    moderate = [i for i in finite if abs(z[i, 0]) <= 1e4]
    assert_grad_rows(grad, ref.binary_focal_ce, z, y, np.ones(len(z)), moderate, rtol=2e-5, atol=1e-38, **options)
    assert np.all(loss[11:13] == 0.0) and np.all(grad[11:13] == 0.0)
    assert np.all(loss[13:15] == np.inf)
    assert np.isnan(loss[15]) and np.isnan(grad[15, 0])


def check_softmax_focal_extreme_inputs(k, c, options):
    base, masked, nan_row = extreme_rows(11 + c, c)
    inf_row = base.copy()
    inf_row[1] = np.inf
    rows = [
        (base * 1e4, int(np.argmax(base))),         # 0: +-1e4, label at the max: loss ~ 0
        (base * 1e4, int(np.argmin(base))),         # 1: +-1e4, label at the min: loss ~ 2e4
        (np.where(base > 0, 1e30, -1e30), 0),       # 2: +-1e30
        (base + 1e4, 0),                            # 3: a common offset of 1e4
        (masked, 0),                                # 4: -inf masks odd classes (no target mass there)
        (base, c - 1),                              # 5: label at the last class
        (masked, 1),                                # 6: the target on a masked class: +inf
        (np.full(c, -np.inf), 0),                   # 7: all -inf: +inf, zero gradient
        (nan_row, 0),                               # 8: NaN in
        (inf_row, 0),                               # 9: a +inf logit at another class than the label
    ]
    z = np.stack([np.asarray(r, f32) for r, _ in rows])
    y = np.eye(c, dtype=f32)[[label for _, label in rows]]
    loss, _, grad = k.run("softmax_focal_ce", z, y, focal_kernel_options(options))
    good = [0, 1, 2, 3, 4, 5]
    want = ref.softmax_focal_ce(z[good], y[good], **options)
    # row 0's true loss can be ~1e-12 (a runner-up 30 below the max): float32's log(1 + 1e-13) is 0, as the
    # portable path's
    np.testing.assert_allclose(loss[good], want, rtol=2e-5, atol=1e-6)
    assert 0.0 <= loss[0] <= 1e-3
    want_grad = softmax_focal_grad_closed_form(z[good], y[good], options.get("gamma", 2.0), options.get("alpha"))
    np.testing.assert_allclose(grad[good], want_grad, rtol=2e-5, atol=1e-6)
    assert np.all(grad[4, 1::2] == 0.0)  # masked classes: exactly zero gradient
    assert loss[6] == np.inf and loss[7] == np.inf and np.all(grad[7] == 0.0)
    assert np.isnan(loss[8]) and np.all(np.isnan(grad[8]))
    # a +inf logit: +inf at gamma = 0, NaN above (0 * (1 - p)^gamma with p NaN), as the portable path: never finite
    assert not np.isfinite(loss[9])


# --- regression NLLs -------------------------------------------------------------------------------------------

NLL_OPS = {"gaussian_nll": ref.gaussian_nll, "laplace_nll": ref.laplace_nll}


def check_nll_matches_reference(k, op, rows, dim, sampled=None):
    rng = np.random.default_rng(rows + dim)
    params, targets = (a.astype(f32) for a in _location_scale(rng, rows, 2 * dim))
    dloss = rng.uniform(0.5, 1.5, rows).astype(f32)
    loss, _, grad = k.run(op, params, targets)
    np.testing.assert_allclose(loss, NLL_OPS[op](params, targets), rtol=2e-5, atol=2e-6)
    _, _, grad = k.run(op, params, targets, dloss=dloss)
    sampled = list(range(rows)) if sampled is None else sampled
    assert_grad_rows(grad, NLL_OPS[op], params, targets, dloss, sampled)


def check_nll_extreme_inputs(k, op):
    # (location, log_scale, target)
    table = [(1e4, 0.0, 0.0), (0.0, 30.0, 1e4), (0.0, -10.0, 1e-3), (0.0, 80.0, 1.0), (1e-3, -40.0, 0.0),
             (5.0, 0.0, 5.0),  # residual 0: d/dm is 0 (Laplace: sign(0) = 0)
             (1e30, 0.0, 0.0), (0.0, -90.0, 1.0),  # the square or 1/scale overflows: +inf
             (0.0, np.inf, 1.0), (np.nan, 0.0, 1.0), (0.0, 0.0, np.nan)]
    params = np.array([[m, s] for m, s, _ in table], f32)
    targets = np.array([[t] for _, _, t in table], f32)
    loss, _, grad = k.run(op, params, targets)
    finite = slice(0, 6)
    np.testing.assert_allclose(loss[finite], NLL_OPS[op](params[finite], targets[finite]), rtol=2e-5)
    assert_grad_rows(grad, NLL_OPS[op], params, targets, np.ones(len(table)), [1, 2, 3, 5], rtol=2e-5)
    np.testing.assert_allclose(grad[0], [1e4 if op == "gaussian_nll" else 1.0, 1.0 - (1e8 if op == "gaussian_nll"
                                                                                    else 1e4)], rtol=1e-6)
    assert grad[5, 0] == 0.0 and grad[5, 1] == 1.0
    if op == "gaussian_nll":
        assert loss[6] == np.inf and loss[7] == np.inf
    assert loss[8] == np.inf
    assert np.isnan(loss[9]) and np.all(np.isnan(grad[9])) and np.isnan(loss[10]) and np.all(np.isnan(grad[10]))
