"""Choose where Numba keeps the on-disk cache of these kernels, before any ``@njit(cache=True)`` is defined.

Numba picks a cache folder for a function when the function is defined: ``numba.config.CACHE_DIR`` if set,
else ``__pycache__`` beside the source if writable, else ``~/.cache/numba``; with none writable, the definition
fails ("no locator available"). Two more facts shape what we do:

- an installed package is often read-only, and a home folder may be too;
- a cache entry records the *module name* it was compiled under and imports that name when loaded, so a cache
  written by a copy loaded under another name (tests and benchmark scripts load this folder standalone, without
  importing Keras) would break a later ``import keras_stable_heads.kernels`` with ModuleNotFoundError.

So ``numba_cache_dir`` sets ``numba.config.CACHE_DIR`` only while the kernel modules are being defined, then
restores it (no process-wide side effect):

- loaded as ``keras_stable_heads.kernels`` with a writable package folder: Numba's own choice (``__pycache__``);
- loaded as ``keras_stable_heads.kernels``, package read-only: ``$NUMBA_CACHE_DIR`` if set, else
  ``$XDG_CACHE_HOME`` or ``~/.cache`` / ``keras_stable_heads/numba``, else the temp folder;
- loaded under any other name: the same user folder, in a sub-folder named after that module name.
"""

import contextlib
import os
import re
import tempfile

import numba

from ._config import CACHE_SUBDIR

CANONICAL_NAME = "keras_stable_heads.kernels"


def _writable_dir(path):
    """True if ``path`` is (or can be made) a folder we can create files in."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path)
    except OSError:
        return False
    os.close(fd)
    try:
        os.remove(name)
    except OSError:
        pass
    return True


def candidate_cache_dirs(environ=None):
    """User cache folders to try, in order."""
    environ = os.environ if environ is None else environ
    roots = []
    if environ.get("NUMBA_CACHE_DIR"):
        roots.append(environ["NUMBA_CACHE_DIR"])
    if environ.get("XDG_CACHE_HOME"):
        roots.append(environ["XDG_CACHE_HOME"])
    home = os.path.expanduser("~")
    if home and home != "~":
        roots.append(os.path.join(home, ".cache"))
    dirs = [os.path.join(root, *CACHE_SUBDIR) for root in roots]
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    dirs.append(os.path.join(tempfile.gettempdir(), f"{CACHE_SUBDIR[0]}-{uid}", CACHE_SUBDIR[1]))
    return dirs


def select_cache_dir(package_name, package_dir, environ=None, is_writable=_writable_dir):
    """The folder for ``numba.config.CACHE_DIR`` while the kernels are defined, or None for Numba's own choice."""
    canonical = package_name == CANONICAL_NAME
    if canonical and not (environ or os.environ).get("NUMBA_CACHE_DIR") \
            and is_writable(os.path.join(package_dir, "__pycache__")):
        return None
    suffix = "" if canonical else "-as-" + re.sub(r"[^A-Za-z0-9_.]", "_", package_name)
    for path in candidate_cache_dirs(environ):
        if is_writable(path + suffix):
            return path + suffix
    return None


@contextlib.contextmanager
def numba_cache_dir(package_name, package_dir):
    """Within the block, functions defined with ``cache=True`` cache under ``select_cache_dir(...)``."""
    path = select_cache_dir(package_name, package_dir)
    previous = numba.config.CACHE_DIR
    if path is not None:
        numba.config.CACHE_DIR = path
    try:
        yield path
    finally:
        numba.config.CACHE_DIR = previous
