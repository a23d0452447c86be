"""Benchmarks of keras-stable-heads against the built-in losses (scripts, never part of the tests).

- ``harness.py``: the one timing harness (:func:`harness.measure`), the record schema, the machine's memory
  bandwidth (the roofline), peak memory, versions and hardware.
- ``baselines.py``: every implementation compared, per backend: the stable ops (each implementation the
  dispatcher can choose) and the built-ins (Keras, ``tf.nn``, ``torch.nn.functional``, ``optax``).
- ``suite.py``: the plan (quick / full sizes), the loop, and the exactness column against ``tests/reference.py``.
- ``report.py``: the table (terminal and Markdown). ``plot.py``: the PNGs. ``gpu_run.sh``: a prepared GPU run.

Run through the command line (one process per Keras backend): ``keras-stable-heads bench [--full]``.
Loaded as a package by :mod:`keras_stable_heads.bench` from the source checkout.
"""
