"""One small module per Keras backend that hands its tensors to a NumPy kernel pair, zero-copy.

Each exposes ``run(pair, logits, labels) -> per-row loss`` for 2-D float32 logits, with the gradient of the
logits computed by ``pair.backward`` from the forward's saved per-row values (float32 ``[N, pair.saved_width]``,
allocated by the bridge).
"""
