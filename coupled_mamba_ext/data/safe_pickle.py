"""Reading pickles of numpy arrays without running code from the file.

A pickle names the functions and classes that rebuild its objects ("globals", such as
``numpy.dtype``), and plain ``pickle.load`` imports and calls whatever it names: a file can
run any code. ``load_restricted`` admits only the globals that a pickle of numpy arrays and
builtin containers holds, and refuses any other before it is called.
"""
import pickle
from typing import Any, BinaryIO, Callable, Dict, Tuple

import numpy as np

try:  # numpy >= 2 keeps its internals in numpy._core; numpy 1.x in numpy.core
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it to store bytes (``encode(text, 'latin1')``),
    for that encoding only: a codec is looked up by name, and only this one is needed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise ForbiddenGlobalError("_codecs.encode", f"with encoding {encoding!r}")
    return text.encode("latin1")


# What numpy's own pickles of arrays, dtypes and scalars refer to, under the module names of
# numpy 2 (numpy._core) and of numpy 1.x (numpy.core), which wrote most published files.
_NUMPY_GLOBALS = {"multiarray": {"_reconstruct": _multiarray._reconstruct,
                                 "scalar": _multiarray.scalar},
                  "numeric": {"_frombuffer": _numeric._frombuffer}}
_BUILTIN_TYPES = (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex,
                  bool)

ADMITTED: Dict[Tuple[str, str], Callable] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{package}.{module}", name): obj
       for package in ("numpy._core", "numpy.core")
       for module, names in _NUMPY_GLOBALS.items() for name, obj in names.items()},
    # builtins as protocol 3 and later name them, __builtin__ as protocols 0-2 do
    **{(module, cls.__name__): cls
       for module in ("builtins", "__builtin__") for cls in _BUILTIN_TYPES},
    ("_codecs", "encode"): _latin1_bytes,
}
"""(module, name) of every global ``load_restricted`` admits, and the object it stands for."""


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle refers to a global that ``load_restricted`` does not admit; ``name`` is it
    ("module.name"), ``detail`` says how it was used when the name itself is admitted."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(f"the pickle refers to {name}{' ' + detail if detail else ''}")
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ADMITTED[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(f"{module}.{name}") from None


def load_restricted(file: BinaryIO) -> Any:
    """Unpickle ``file`` (open for reading bytes), admitting only the globals of ``ADMITTED``:
    numpy arrays (any dtype, object arrays of admitted objects included), dtypes and scalars,
    and builtin containers and scalars. Any other global raises ForbiddenGlobalError before it
    is imported or called. Reads as fast as ``pickle.load`` (the same C unpickler) and builds
    the same objects, without copies."""
    return _RestrictedUnpickler(file).load()
