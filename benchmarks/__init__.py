"""Benchmarks of keras-stable-heads against the built-in losses (scripts, never part of the tests).

- ``harness.py``: the one timing harness (:func:`harness.measure`), the record schema, the machine's memory
  bandwidth (the roofline), peak memory, versions and hardware.
- ``baselines.py``: every implementation compared, per backend: the stable ops (each implementation the
  dispatcher can choose) and the built-ins (Keras, ``tf.nn``, ``torch.nn.functional``, ``optax``).
- ``suite.py``: the plans (quick, full, gpu), the loop with its time budget, and the exactness column against
  ``tests/reference.py``.
- ``report.py``: the tables (terminal and Markdown), one section per device. ``plot.py``: the PNGs, devices apart.
- GPU: ``gpu_prepare.sh`` (wheels and commit, on the developer's machine), ``gpu_run.sh`` (the one prepared run:
  GPU tests, ``bench --gpu`` on PyTorch and JAX, ``gpu_profile.py``), ``gpu_collect.py`` (its files into
  ``results/``), ``gpu_convert.py`` (one-off: the first H200 run's records into the harness's schema).

Run through the command line (one process per Keras backend): ``keras-stable-heads bench [--full | --gpu]``.
Loaded as a package by :mod:`keras_stable_heads.bench` from the source checkout.
"""
