"""One ``fit`` step of a keras-hub causal LM: keras-hub's compile against :func:`keras_stable_heads.hub.fuse_lm_head`.

    python -m keras_stable_heads.bench.hub_fit [--backend all] [--vocab 131072] [--batch 4] [--sequence 512] [--reps 3]
    python -m keras_stable_heads.bench.hub_fit --report      # the table and hub_fit_step.png of the latest run

The model is a one-layer keras-hub ``GemmaBackbone`` (hidden size 256, 4 query heads and 1 key-value head of 64,
feed-forward 1024, the ``V``-token embedding tied to the output) in a ``GemmaCausalLM`` without preprocessor;
``--family gemma,gpt2`` adds the same-sized ``GPT2Backbone`` / ``GPT2CausalLM`` (learned positions, no dropout).
Two variants, each built from seed 0 (the same weights) and trained with ``train_on_batch(x, y,
sample_weight=padding_mask)`` and ``Adam(1e-4)`` on the same seeded batch of token ids:

- ``default``: ``causal_lm.compile(optimizer=...)`` as keras-hub has it: ``SparseCategoricalCrossentropy(
  from_logits=True)`` on the ``(batch, sequence, V)`` logits and the weighted accuracy;
- ``fused``: ``fuse_lm_head(causal_lm)`` and the same ``compile``: the same loss and accuracy from the hidden
  states, one chunk of tokens at a time (the logits never exist).

Each runs in a process of its own (:mod:`.per_process`, shared with :mod:`.lm_head`), so the record's peak RSS is
its own; it also has the RSS before the first step (the framework, keras-hub, the model, Adam's slots and the data),
on JAX the compiled step's temporary memory from XLA, and the losses of every step (the two variants' agree to
float32 rounding). Times are the min and median of ``--reps`` steps after one warm-up step (compilation). One JSON
record per (family, backend, variant) is appended to ``hub_fit_records.jsonl`` (the checkout's
``benchmarks/results/``, else the current folder) and ``hub_fit_step.png`` is drawn beside it from the run's
records. Benchmarks are measurements, never tests: compare only records of one run.
"""

import os
import sys

from . import locations
from . import per_process

VARIANTS = ("default", "fused")
FAMILIES = ("gemma", "gpt2")
HIDDEN = 256
_FOLDER = locations.RESULTS or os.getcwd()
RECORDS = os.path.join(_FOLDER, "hub_fit_records.jsonl")
PLOT = os.path.join(_FOLDER, "hub_fit_step.png")
# Peak memory of the default step, in logits-sized (tokens x V float32) buffers beyond the weights: measured
# about 4.5 at 2048 x 131072; 6 leaves headroom.
DEFAULT_LOGIT_BUFFERS = 6


def _loss(field):
    return lambda r: f"{r[field]:.6f}"


BENCHMARK = per_process.StepBenchmark(
    name="hub_fit_step", module="keras_stable_heads.bench.hub_fit", run_prefix="hubfit", variants=VARIANTS,
    colors={"default": "#c62828", "fused": "#2e7d32"},
    fields=dict(family=None, batch=None, sequence=None, vocab=None, hidden=HIDDEN, layers=1, dtype="float32",
                optimizer="adam", jit_compile=None, losses=None),
    group=(("family", "family", 6), ("vocab", "V", 7)),
    distributions=("keras-hub",),
    columns=(("first loss", 10, _loss("first_loss")), ("last loss", 10, _loss("last_loss"))),
    title=lambda first: (f"One train_on_batch of a one-layer keras-hub CausalLM (hidden {first['hidden']}, "
                         f"{first['batch']} x {first['sequence']} tokens, Adam): keras-hub's compile against "
                         f"fuse_lm_head\n{first['device_name']}; run {first['run_id']}"))


def _estimate_gib(variant, batch, sequence, vocab):
    weights = 4 * HIDDEN * vocab * 4  # the embedding, its gradient, Adam's two slots
    logits = batch * sequence * vocab * 4
    extra = DEFAULT_LOGIT_BUFFERS * logits if variant == "default" else 2 * (256 << 20)  # linear_ce's chunks
    return (weights + extra + (2 << 30)) / (1 << 30)  # + the frameworks and keras-hub


def causal_lm(family, vocab, sequence):
    """The benchmark's one-layer keras-hub ``CausalLM`` (no preprocessor), its weights drawn from seed 0."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    if family == "gemma":
        backbone = keras_hub.models.GemmaBackbone(vocabulary_size=vocab, num_layers=1, num_query_heads=4,
                                                  num_key_value_heads=1, hidden_dim=HIDDEN,
                                                  intermediate_dim=4 * HIDDEN, head_dim=64)
        return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    if family == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=vocab, num_layers=1, num_heads=4, hidden_dim=HIDDEN,
                                                 intermediate_dim=4 * HIDDEN, max_sequence_length=sequence,
                                                 dropout=0.0)
        return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")


def batch_of_tokens(batch, sequence, vocab):
    """``(x, y, padding_mask)``, seeded: token ids and next-token labels in ``[1, vocab)``; the first sequence
    fills the window, the others are padded after a length drawn from ``[sequence / 2, sequence]``."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.concatenate([[sequence], rng.integers(sequence // 2, sequence + 1, batch - 1)])
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype("int32")
    tokens = rng.integers(1, vocab, (batch, sequence)).astype("int32") * mask
    labels = rng.integers(1, vocab, (batch, sequence)).astype("int32") * mask
    return {"token_ids": tokens, "padding_mask": mask}, labels, mask.astype("float32")


def _child(args):
    import keras

    from ..hub import fuse_lm_head

    backend = keras.backend.backend()
    x, y, weights = batch_of_tokens(args.batch, args.sequence, args.vocab)
    model = causal_lm(args.family, args.vocab, args.sequence)
    if args.variant == "fused":
        fuse_lm_head(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.optimizer.build(model.trainable_variables)
    temp = per_process.xla_temp_bytes(model, (x, y, weights))

    def step():
        return float(model.train_on_batch(x, y, sample_weight=weights, return_dict=True)["loss"])

    BENCHMARK.measure(args, backend, step, xla_temp_bytes=temp, family=args.family, batch=args.batch,
                      sequence=args.sequence, vocab=args.vocab, jit_compile=bool(model.jit_compile))


# one run's records, its table (fused's ratios to the others) and its plot
load, table, plot = BENCHMARK.load, BENCHMARK.table, BENCHMARK.plot


def run(args, backends, variants, families, vocabs, echo=print):
    """Measure every (family, vocabulary, backend, variant) in a process of its own; returns the number that
    failed. ``args`` holds batch, sequence, reps, memory_gib, out and run_id (set here when None)."""
    jobs = [per_process.Job(backend, variant, dict(family=family, batch=args.batch, sequence=args.sequence,
                                                   vocab=vocab),
                            _estimate_gib(variant, args.batch, args.sequence, vocab))
            for family in families for vocab in vocabs for backend in backends for variant in variants]
    return BENCHMARK.run(args, jobs, echo=echo)


def _add_sizes(parser):
    parser.add_argument("--family", default="gemma", help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--vocab", default="131072", help="comma list of vocabulary sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequence", type=int, default=512)


def _one_measurement(args):  # --child: one family, one vocabulary
    args.vocab = int(args.vocab)
    _child(args)


def _every_measurement(args, backends, variants):
    families = tuple(args.family.split(","))
    if set(families) - set(FAMILIES):
        raise SystemExit(f"--family from {FAMILIES}")
    return run(args, backends, variants, families, [int(v) for v in args.vocab.split(",")])


def main(argv=None):
    return BENCHMARK.main(argv, description=__doc__.splitlines()[0], records=RECORDS, plot=PLOT,
                          add_sizes=_add_sizes, child=_one_measurement, run=_every_measurement)


if __name__ == "__main__":
    sys.exit(main())
