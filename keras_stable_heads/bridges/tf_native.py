"""TensorFlow's own fused sparse softmax cross-entropy as the ``native`` implementation.

``tf.nn.sparse_softmax_cross_entropy_with_logits`` computes ``lse(z) - z_y`` from the logits with its gradient
``softmax - onehot`` in one op: the portable path's formula in a graph of a few ops instead of the portable
path's label bookkeeping. It runs eagerly, in ``tf.function``, under XLA and ``tf.distribute``. Around it:
out-of-range labels are clamped before the op (TensorFlow raises on them on the CPU) and ignored entries get 0;
where the op's formula gives NaN and this package's does not — an out-of-range label (NaN here, in a compiled
step), a row whose logits are all ``-inf`` (+inf here) — ``tf.cond`` computes the batch on the portable path
(``exact``) instead, so results never depend on the choice. Only the ops the dispatcher sends it: no options but
``ignore_class`` (``dispatch._native_options_blocker``).
"""

import tensorflow as tf


def run(op, logits, labels, options, exact, check_labels=None):  # labels are range-checked before, in eager mode
    num_classes = logits.shape[-1]
    ignore = options.get("ignore_class")
    y = tf.cast(labels, tf.int32)
    in_range = tf.logical_and(y >= 0, y < num_classes)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(in_range, y, 0), logits=logits)
    if ignore is None:
        kept = in_range
    else:
        ignored = tf.equal(y, ignore)
        kept = tf.logical_and(in_range, tf.logical_not(ignored))
        in_range = tf.logical_or(in_range, ignored)  # ignored labels are valid ones
        loss = tf.where(kept, loss, tf.zeros_like(loss))
    needs_exact = tf.logical_or(tf.reduce_any(tf.logical_not(in_range)), tf.reduce_any(tf.math.is_nan(loss)))
    return tf.cond(needs_exact, exact, lambda: loss)
