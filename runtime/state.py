"""The recurrent state the runtime engines carry: named float32 arrays plus the position, laid
out as :mod:`edge_lolcats.arch.state` says (the ONNX graphs' input names), so both engines keep
the same state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_lolcats.arch.state import DTYPE, StateLayout

@dataclass
class State:
    tensors: dict  # name -> np.ndarray [B, ...]
    position: int  # tokens seen
    # the compiled engine's buffer [B, size] that ``tensors`` are views of (None: separate arrays)
    flat: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def copy(self) -> "State":
        """An independent copy (engines update a state's arrays in place)."""
        return State({n: a.copy() for n, a in self.tensors.items()}, self.position)


def empty_state(layout: StateLayout, batch: int = 1) -> State:
    return State({n: np.zeros(shape, np.dtype(DTYPE)) for n, shape in layout.shapes(batch).items()}, 0)


# --- state files: a session saved to disk and resumed later -------------------------------------

STATE_FILE_FORMAT = "edge-lolcats-state"
# 2: the window ring per KV head, sink tokens (arch.state). Version 1 files held the ring per query head:
# they are refused with that reason.
STATE_FILE_VERSION = 2


class StateFileError(ValueError):
    pass


def save_state_file(path: str, state: State, meta: dict, arrays: dict | None = None) -> int:
    """Write ``state`` (its arrays, position) with ``meta`` (JSON: model identity, pending tokens,
    sampler) and extra ``arrays`` to one ``.npz`` file, atomically. Returns the file size."""
    import json
    import os

    from edge_lolcats.formats.fileio import atomic_file

    header = {"format": STATE_FILE_FORMAT, "version": STATE_FILE_VERSION, "position": state.position, **meta}
    payload = {"__header__": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
               **{f"extra.{k}": v for k, v in (arrays or {}).items()}, **state.tensors}
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **payload)
    return os.path.getsize(path)


def load_state_file(path: str, expected: State) -> tuple[State, dict, dict]:
    """(state, header, extra arrays) from a state file; every array must match ``expected``'s
    names, shapes and dtype. Refusing the wrong model is the caller's job (it knows the identity)."""
    import json
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            files = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise StateFileError(f"{path}: no such state file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StateFileError(f"{path}: not a readable state file ({type(e).__name__})") from None
    try:
        header = json.loads(files.pop("__header__").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise StateFileError(f"{path}: not an edge-lolcats state file (no header)") from None
    if header.get("format") != STATE_FILE_FORMAT:
        raise StateFileError(f"{path}: not an edge-lolcats state file")
    if header.get("version") == 1:
        raise StateFileError(f"{path}: a version 1 state file, from a runtime before the window ring was kept per "
                             f"key/value head; this runtime reads version {STATE_FILE_VERSION}: run the prompt again "
                             f"to make a new one")
    if header.get("version") != STATE_FILE_VERSION:
        raise StateFileError(f"{path}: state file version {header.get('version')}; this runtime reads {STATE_FILE_VERSION}")
    extra = {k[len("extra."):]: files.pop(k) for k in list(files) if k.startswith("extra.")}
    if set(files) != set(expected.tensors):
        raise StateFileError(f"{path}: state tensors do not match this model's layout "
                             f"({len(files)} in the file, {len(expected.tensors)} expected)")
    for name, a in files.items():
        e = expected.tensors[name]
        if a.shape[1:] != e.shape[1:] or a.dtype != e.dtype:
            raise StateFileError(f"{path}: state {name} is {a.dtype}{list(a.shape)}, this model needs {e.dtype}[batch, "
                                 f"{', '.join(map(str, e.shape[1:]))}]")
    return State(files, int(header["position"])), header, extra
