"""The benchmark scripts' way to the package: the installed ``keras_stable_heads`` if there is one, else this
checkout's; and sub-packages of it loaded without importing ``keras_stable_heads`` itself (which imports Keras),
for the scripts that run where Keras is not installed (the kernel probe, the GPU profile).
"""

import importlib
import importlib.util
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after site-packages: an installed package wins, this checkout is the fallback


def package_dir():
    """The folder of ``keras_stable_heads`` that ``import keras_stable_heads`` would load (found, not imported)."""
    spec = importlib.util.find_spec("keras_stable_heads")
    return list(spec.submodule_search_locations)[0] if spec else os.path.join(ROOT, "keras_stable_heads")


def load(subpackage, private_name, run_init=True):
    """``keras_stable_heads.<subpackage>`` imported as the package ``private_name``, its parent never imported.
    With ``run_init=False`` its ``__init__.py`` does not run either (only the submodules asked for load)."""
    if private_name in sys.modules:
        return sys.modules[private_name]
    folder = os.path.join(package_dir(), subpackage)
    if run_init:
        spec = importlib.util.spec_from_file_location(private_name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        package = importlib.util.module_from_spec(spec)
        sys.modules[private_name] = package
        spec.loader.exec_module(package)
    else:
        package = types.ModuleType(private_name)
        package.__path__ = [folder]
        sys.modules[private_name] = package
    return package


def harness():
    """``keras_stable_heads.bench.harness`` (NumPy only), without Keras."""
    load("bench", "_keras_stable_heads_bench", run_init=False)
    return importlib.import_module("_keras_stable_heads_bench.harness")
