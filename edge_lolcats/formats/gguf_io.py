"""Reading GGUF files into plain Python values and numpy arrays: our own parser, gguf-py only for
the tensor types we do not write and for dequantizing. No torch here: the runtime uses this module too."""
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
    tensors: dict  # name -> GGUFTensor
    mapping: object = None  # the file's mmap.mmap, which every tensor's data views

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

        mapping = self.mapping
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in row-major order (ggml's reversed shape put back)."""
        if name not in self.tensors:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        return tensor_to_float32(self.tensors[name])


def tensor_to_float32(tensor) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(tensor.shape))  # ggml lists the fastest dimension first
    if tensor.type_id in (names.GGML_TYPE_IDS["F32"], names.GGML_TYPE_IDS["F16"]):
        array = np.asarray(tensor.data, dtype=np.float32)
    else:
        from gguf import quants

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


@dataclass
class GGUFTensor:
    """One tensor of a mapped GGUF file, as gguf-py's ReaderTensor gives it: ``shape`` in ggml's
    order (fastest dimension first), ``data`` a read-only row-major view of the file (float types
    as their numpy dtype; quantized ones as uint8 [..., bytes per row])."""

    name: str
    type_id: int  # ggml's numbering (converters.gguf_names.GGML_TYPES)
    shape: np.ndarray
    data: np.ndarray

    @property
    def tensor_type(self):
        """gguf-py's GGMLQuantizationType (imports gguf-py: the load path uses ``type_id``)."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id)


# GGUF value types (the file format's numbering) -> struct format; 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
ALIGNMENT = 32  # unless general.alignment says otherwise


def _parse(buf, path: str) -> tuple[dict, list, int]:
    """(metadata, [(name, ggml dims, type, offset)], start of the tensor data) of a GGUF file's
    bytes. Values as gguf-py's ``ReaderField.contents()`` gives them (str, int, float, bool, list)."""
    import struct

    pos = 0

    def take(fmt):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string():
        return strings(1)[0]

    def value(kind):
        nonlocal pos
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, n = take("I"), take("Q")
        if item in _NUMPY:  # numbers: one read, as gguf-py's list
            width = np.dtype(_NUMPY[item]).itemsize
            out = np.frombuffer(buf, _NUMPY[item], n, pos).tolist()
            pos += width * n
            return out
        if item == _STRING:  # the vocabulary and merges (~100K strings): one tight loop
            return strings(n)
        return [value(item) for _ in range(n)]

    def strings(n):
        """n strings (length-prefixed UTF-8) from pos, in one tight loop (the vocabulary and merges
        are ~100K of them)."""
        nonlocal pos
        length, end, out = struct.Struct("<Q").unpack_from, len(buf), []
        p = pos
        for _ in range(n):
            (size,) = length(buf, p)
            p += 8
            if p + size > end:
                raise ValueError("a string runs past the end of the file")
            out.append(str(buf[p : p + size], "utf-8"))
            p += size
        pos = p
        return out

    magic, version = take("4s"), take("I")
    if magic != b"GGUF":
        raise ValueError("bad magic")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader reads 2 and 3)")
    n_tensors, n_kv = take("Q"), take("Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = int(metadata.get("general.alignment", ALIGNMENT))
    return metadata, infos, pos + (-pos) % align


def read_gguf(path: str) -> GGUFFile:
    """Open a GGUF file (memory-mapped) and read all of its metadata. Our own reader of the
    format (gguf-py's builds numpy views of every vocabulary string: seconds per load, where this
    takes a fraction of one); tests hold it to gguf-py's GGUFReader on the same files."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
    try:
        mapped = np.memmap(path, mode="r")
        metadata, infos, start = _parse(memoryview(mapped), path)
        tensors = {}
        floats = {names.GGML_TYPE_IDS["F32"]: np.float32, names.GGML_TYPE_IDS["F16"]: np.float16}
        sizes = {id_: (block, size) for id_, block, size in names.GGML_TYPES.values()}
        for name, dims, kind, offset in infos:
            if kind not in sizes:  # a type we do not write: gguf-py knows its blocks
                from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

                sizes[kind] = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            block, size = sizes[kind]
            shape = tuple(reversed(dims))  # row-major
            dtype = floats.get(kind, np.uint8)
            row = shape[-1] if dtype is not np.uint8 else shape[-1] // block * size
            count = int(np.prod(shape[:-1], dtype=np.int64)) * row
            if start + offset + count * np.dtype(dtype).itemsize > len(mapped):
                raise ValueError(f"tensor {name} runs past the end of the file")
            data = np.frombuffer(mapped, dtype, count, start + offset).reshape(*shape[:-1], row)
            if name in tensors:
                raise ValueError(f"tensor {name} appears twice")
            tensors[name] = GGUFTensor(name, kind, np.array(dims, np.uint64), data)
    except Exception as e:  # struct, numpy, unicode or our own ValueErrors: a damaged file
        raise ModelFileError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    return GGUFFile(path, metadata, tensors, mapped._mmap)
