"""Reading GGUF files with gguf-py into plain Python values and numpy arrays. No torch here:
the runtime uses this module too."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edge_lolcats.converters import gguf_names as names


class ModelFileError(ValueError):
    """A model file that is missing, truncated, corrupt or of a kind we do not read."""


@dataclass
class GGUFFile:
    path: str
    metadata: dict  # key -> Python value (str, int, float, bool, list)
    tensors: dict  # name -> gguf.ReaderTensor

    @property
    def architecture(self) -> str:
        return self.metadata.get(names.KEY_ARCHITECTURE, "?")

    def lolcats(self, num_layers: int) -> dict:
        """The linearization a lolcats file records, as a model's ``lolcats`` dict: window, feature
        dim, per-layer kinds (every layer hybrid before the key existed) and the recurrence (the
        first one before format 3). TypeError where a required key is missing."""
        from edge_lolcats.arch.hybrid import Recurrence
        from edge_lolcats.arch.state import HYBRID

        recurrence = Recurrence(self.value(names.KEY_FEATURE_MAPS) or Recurrence.feature_maps,
                                bool(self.value(names.KEY_DECAY) or False), int(self.value(names.KEY_SINK_TOKENS) or 0))
        return {"window_size": int(self.value(names.KEY_WINDOW_SIZE)), "feature_dim": int(self.value(names.KEY_FEATURE_DIM)),
                "feature_map": self.value(names.KEY_FEATURE_MAP),
                "layers": list(self.value(names.KEY_LAYER_KINDS) or [HYBRID] * num_layers), **recurrence.to_dict()}

    def value(self, key: str, default=None):
        """A metadata value by its name in :mod:`edge_lolcats.converters.gguf_names` ("{arch}" filled in)."""
        return self.metadata.get(key.format(arch=self.architecture), default)

    def release_pages(self):
        """Drop the file's pages from this process's resident memory (they stay in the page cache
        and come back on the next access): a loader that copies every tensor out of the mapping
        calls this as it goes, so its peak RSS is not the copies plus the whole mapped file."""
        import mmap

        tensor = next(iter(self.tensors.values()), None)
        mapping = getattr(getattr(tensor, "data", None), "base", None)
        while mapping is not None and not isinstance(mapping, mmap.mmap):
            mapping = getattr(mapping, "base", None) or getattr(mapping, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in row-major order (ggml's reversed shape put back)."""
        if name not in self.tensors:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        return tensor_to_float32(self.tensors[name])


def tensor_to_float32(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(x) for x in reversed(tensor.shape))  # ggml lists the fastest dimension first
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            array = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ModelFileError(f"tensor {tensor.name}: {tensor.tensor_type.name} is not supported ({e})") from None
    return array.reshape(shape)


def read_gguf_architecture(path: str) -> str | None:
    """``general.architecture`` of a GGUF file, or None if it is not one; reads only the header."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                return None
            # version (u32), tensor count (u64), kv count (u64); the first key is general.architecture
            key_len = struct.unpack("<Q", f.read(8))[0]
            if key_len > 256 or f.read(key_len) != names.KEY_ARCHITECTURE.encode():
                return None
            value_type, = struct.unpack("<I", f.read(4))
            if value_type != 8:  # string
                return None
            n = struct.unpack("<Q", f.read(8))[0]
            return f.read(min(n, 256)).decode("utf-8", "replace")
    except (OSError, struct.error):
        return None


def read_gguf(path: str) -> GGUFFile:
    """Open a GGUF file (memory-mapped) and read all of its metadata."""
    import gguf

    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct/numpy errors or IndexError on damage
        raise ModelFileError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except Exception as e:
            raise ModelFileError(f"{path}: unreadable metadata {key!r} ({e})") from None
    return GGUFFile(path, metadata, {t.name: t for t in reader.tensors})
