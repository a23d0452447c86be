"""Benchmarks of keras-stable-heads against the built-in losses: part of the installed package, so
``keras-stable-heads bench`` runs from a wheel as from a checkout. Benchmarks are measurements, never tests.

- :mod:`.harness`: the one timing harness (:func:`harness.measure`), the record schema, the machine's memory
  bandwidth (the roofline), peak memory, versions and hardware (NumPy only: no Keras import).
- :mod:`.baselines`: every implementation compared, per backend: the stable ops (each implementation the
  dispatcher can choose) and the built-ins (Keras, ``tf.nn``, ``torch.nn.functional``, ``optax``).
- :mod:`.suite`: the plans (quick, full, gpu), the loop with its time budget, and the exactness column against
  the float64 references of :mod:`keras_stable_heads.reference` (the same the tests use).
- :mod:`.report`: the tables (terminal and Markdown), one section per device (standard library only).
- :mod:`.locations`: where records go: the checkout's ``benchmarks/results/`` from a source checkout, else the
  current folder.
- :mod:`.command`: the ``keras-stable-heads bench`` command line (one process per Keras backend).
- :mod:`.lm_head` (a fused vocabulary head against Dense + a loss) and :mod:`.hub_fit` (a keras-hub causal LM,
  its own compile against ``fuse_lm_head``): one training step per (backend, variant), each in a process of its
  own, through :mod:`.per_process` (the child-process loop, the records, the table and the plot they share).

The checkout's ``benchmarks/`` folder keeps the results, the plot script and the GPU and probe scripts.
"""
