"""TensorFlow: ``tf.numpy_function`` inside ``tf.custom_gradient`` (eager and ``tf.function``, not XLA).

Inputs arrive zero-copy; outputs are allocated 64-byte aligned, which TensorFlow adopts without a copy; gradient
buffers come from the reuse pool in ``_memory.py``.
"""

import numpy as np
import tensorflow as tf

from ._memory import GRADIENTS, aligned_empty


def run(pair, logits, labels):
    @tf.custom_gradient
    def op(z):
        def forward(z_np, y_np):
            loss, saved = aligned_empty(z_np.shape[:1]), aligned_empty((z_np.shape[0], pair.saved_width))
            pair.forward(np.ascontiguousarray(z_np), np.ascontiguousarray(y_np), loss, saved)
            return loss, saved

        loss, saved = tf.numpy_function(forward, [z, labels], [tf.float32, tf.float32], stateful=False)
        loss.set_shape(z.shape[:1])
        saved.set_shape(z.shape[:1].concatenate([pair.saved_width]))

        def grad(dloss):
            def backward(z_np, y_np, saved_np, dloss_np):
                out = GRADIENTS.empty(z_np.shape)  # reused once TensorFlow has dropped it: see _memory.py
                pair.backward(np.ascontiguousarray(z_np), np.ascontiguousarray(y_np), np.ascontiguousarray(saved_np),
                              np.ascontiguousarray(dloss_np, np.float32), out)
                return out

            g = tf.numpy_function(backward, [z, labels, saved, dloss], tf.float32, stateful=False)
            g.set_shape(z.shape)
            return g

        return loss, grad

    return op(logits)
