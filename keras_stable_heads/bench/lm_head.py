"""One training step of a large-vocabulary head: the fused linear cross-entropy against Dense + a loss.

    python -m keras_stable_heads.bench.lm_head [--backend all] [--tokens 4096] [--hidden 512] [--vocab 131072,262144]

For each backend and vocabulary size, three ways to train a ``V``-way softmax head on ``(N, D)`` hidden states with
``model.train_on_batch`` (Adam, the whole batch at once):

- ``fused``: :class:`keras_stable_heads.FusedSoftmaxHead` with its loss (the logits are never materialised);
- ``dense+keras``: ``Dense(V)`` + ``SparseCategoricalCrossentropy(from_logits=True)``;
- ``dense+stable``: ``Dense(V)`` + :class:`keras_stable_heads.StableSparseSoftmaxCE`.

Each runs in a process of its own, so its peak resident memory is its own: the record has the process's peak RSS
over the steps, the RSS just before the first step (the framework, the model, the optimizer's slots and the data)
and on JAX the compiled step's temporary memory from XLA (``memory_analysis()``). Times are the min and median
of ``--reps`` steps after one warm-up step (compilation). A variant whose estimated memory does not fit
(``--memory-gib``) is recorded as skipped. One JSON record per (backend, vocabulary, variant), with the hardware,
versions and commit of the harness, is appended to ``lm_head_records.jsonl`` (in the checkout's
``benchmarks/results/``, else the current folder), and ``lm_head_step.png`` is drawn beside it from the run's
records. The demo's ``vocabulary`` task runs the same measurement at a smaller size (:func:`run`).
Benchmarks are measurements, never tests: compare only records of one run.
"""

import os
import sys

from . import locations
from . import per_process

BACKENDS = per_process.BACKENDS
VARIANTS = ("fused", "dense+keras", "dense+stable")
_FOLDER = locations.RESULTS or os.getcwd()
RECORDS = os.path.join(_FOLDER, "lm_head_records.jsonl")
PLOT = os.path.join(_FOLDER, "lm_head_step.png")
# Peak memory of the Dense variants, in logits-sized (N x V float32) buffers beyond the weights and the framework,
# per backend: measured (peak - before) / logits at 4096 x 131072 in run lmhead-20261207T015825: TensorFlow 2.1,
# JAX 4.1 (Keras's loss) and 3.1, torch 4.1 and 3.2; one more buffer leaves headroom.
DENSE_LOGIT_BUFFERS = {"tensorflow": 3, "jax": 5, "torch": 5}

BENCHMARK = per_process.StepBenchmark(
    name="lm_head_step", module="keras_stable_heads.bench.lm_head", run_prefix="lmhead", variants=VARIANTS,
    colors={"fused": "#2e7d32", "dense+keras": "#c62828", "dense+stable": "#1565c0"},
    fields=dict(tokens=None, hidden=None, vocab=None, dtype="float32", optimizer="adam"),
    group=(("vocab", "V", 7),),
    title=lambda first: (f"One training step of a V-way head on {first['tokens']} x {first['hidden']} hidden "
                         f"states (Adam); {first['device_name']}; run {first['run_id']}"))


def _estimate_gib(backend, variant, tokens, hidden, vocab):
    weights = 4 * hidden * vocab * 4  # kernel, its gradient, Adam's two slots
    logits = tokens * vocab * 4
    extra = DENSE_LOGIT_BUFFERS[backend] * logits if variant.startswith("dense") else 2 * (64 << 20)
    return (weights + extra + (2 << 30)) / (1 << 30)  # + the framework itself


def _model(variant, hidden, vocab):
    import keras

    import keras_stable_heads as ksh

    keras.utils.set_random_seed(0)
    inputs = keras.Input((hidden,))
    if variant == "fused":
        head = ksh.FusedSoftmaxHead(vocab)
        model = keras.Model(inputs, head(inputs))
        loss = head.loss()
    else:
        model = keras.Model(inputs, keras.layers.Dense(vocab)(inputs))
        loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if variant == "dense+keras"
                else ksh.StableSparseSoftmaxCE())
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def _child(args):
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, args.hidden), dtype=np.float32)
    y = rng.integers(0, args.vocab, args.tokens).astype(np.int32)
    model = _model(args.variant, args.hidden, args.vocab)
    model.optimizer.build(model.trainable_variables)
    temp = per_process.xla_temp_bytes(model, (x, y))
    BENCHMARK.measure(args, backend, lambda: float(model.train_on_batch(x, y, return_dict=True)["loss"]),
                      xla_temp_bytes=temp, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab)


# one run's records, its table (fused's ratios to the others) and its plot
load, table, plot = BENCHMARK.load, BENCHMARK.table, BENCHMARK.plot


def _add_sizes(parser):
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", default="131072,262144", help="comma list of vocabulary sizes")


def _one_vocabulary(args):  # --child: --vocab is one size
    args.vocab = int(args.vocab)
    _child(args)


def _every_vocabulary(args, backends, variants):
    return run(args, backends, variants, [int(v) for v in args.vocab.split(",")])


def main(argv=None):
    return BENCHMARK.main(argv, description=__doc__.splitlines()[0], records=RECORDS, plot=PLOT,
                          add_sizes=_add_sizes, child=_one_vocabulary, run=_every_vocabulary)


def run(args, backends, variants, vocabs, echo=print):
    """Measure every (vocabulary, backend, variant) in a process of its own; returns the number that failed.
    ``args`` holds tokens, hidden, reps, memory_gib, out and run_id (set here when None)."""
    jobs = [per_process.Job(backend, variant, dict(tokens=args.tokens, hidden=args.hidden, vocab=vocab),
                            _estimate_gib(backend, variant, args.tokens, args.hidden, vocab))
            for vocab in vocabs for backend in backends for variant in variants]
    return BENCHMARK.run(args, jobs, echo=echo)


if __name__ == "__main__":
    sys.exit(main())
