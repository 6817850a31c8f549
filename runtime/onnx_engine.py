"""onnxruntime engine over an ONNX export (``model.onnx``, ``decode.onnx``, ``weights.bin``,
``model.json``; see :mod:`edge_lolcats.converters.onnx_export`). No torch.

The state is a dict of numpy arrays named as in the graphs (``state.{i}.kv`` ...) plus the
position; every call is ``(tokens, position, state) -> (logits of the last token, new state)``.
One token of one sequence runs the static decode graph, anything else the block graph.

Memory: ``weights.bin`` is mapped, not read, and its arrays are handed to both sessions as
user-owned initializers, so the two graphs share one copy of the weights (file-backed pages).
The decode session pre-packs its weights (a private copy, worth 1.4x per token). The block session
pre-packs them only in int8 / int4 exports, where MatMulNBits multiplies in int8 only from packed
weights (prefill +45-75%, peak RSS -20 to +30 MB); float32 MatMuls pack on the fly at no measurable
cost, and a packed copy would hold another 500 MB (SmolLM2).
"""
from __future__ import annotations

import json
import mmap
import os

import numpy as np

from edge_lolcats.formats.gguf_io import ModelFileError
from edge_lolcats.formats.tokenizer import Tokenizer
from .state import State as OnnxState


RELEASE_EVERY = 128  # embedding rows read between two releases of the embedding's pages


class OnnxEngine:
    def __init__(self, folder: str, threads: int | None = None):
        meta_path = os.path.join(folder, "model.json")
        if not os.path.isfile(meta_path):
            raise ModelFileError(f"{folder}: no model.json (not an edge-lolcats ONNX export)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != "edge-lolcats-onnx":
            raise ModelFileError(f"{meta_path}: not an edge-lolcats ONNX export")
        self._mapping, self._embedding_pages, self._rows_read = None, None, 0
        self._weights = self._map_weights(folder)
        quantized = self.meta.get("weights") in ("int8", "int4")
        self.session = self._session(folder, self.meta["graph"], threads, prepack=quantized or not self._weights,
                                     block=True)
        decode = self.meta.get("decode_graph")  # exports before format 2 have the block graph only
        self.decode_session = self._session(folder, decode, threads, prepack=True, block=False) if decode else None
        self.state_names = self.meta["inputs"][2:]
        graph_inputs = {i.name: i.shape for i in self.session.get_inputs()}
        for name, spec in self.meta["state"].items():
            shape = graph_inputs.get(name)
            if shape is None or [d if isinstance(d, int) else "batch" for d in shape] != spec["shape"]:
                raise ModelFileError(f"{folder}: state {name} is {shape} in the graph, {spec['shape']} in model.json")
        self.tokenizer = Tokenizer.from_folder(folder, eos_token_ids=self.meta.get("eos_token_ids"))
        # the decode graph's bound inputs (written in place each step) and bindings (_decode_binding)
        self._token, self._position = np.zeros((1, 1), np.int64), np.zeros((), np.int64)
        self._bindings = []

    format = "onnx"
    name = "onnx"
    # prompt tokens per block graph call (generation.prefill): 256 against 128, 1K tokens, fresh
    # processes on the Zen 5 VM, by hand: int8 352-385 vs 271-305 tok/s at 627-634 vs 614-617 MB
    # peak RSS; f32 538-596 vs 444-469 (512: int8 354-403 at 671 MB). docs/BENCHMARKS.md, session 17
    prefill_chunk = 256

    def _map_weights(self, folder: str) -> dict:
        """{graph file: {initializer: OrtValue over the mapped weights file}}; {} if the export
        keeps its weights inside the graphs."""
        import onnxruntime as ort

        table = self.meta.get("external_initializers")
        if not table:
            return {}
        path = os.path.join(folder, self.meta["weights_file"])
        try:
            with open(path, "rb") as f:
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{path}: cannot map ({e})") from None
        data = np.frombuffer(self._mapping, dtype=np.uint8)
        embedding = [self.meta.get("vocab_size"), self.meta.get("hidden_size")]
        values, out = {}, {}
        for graph, entries in table.items():
            out[graph] = {}
            for name, e in entries.items():
                key = (e["offset"], e["dtype"], tuple(e["shape"]))
                if key not in values:
                    if e["offset"] + e["length"] > data.size:
                        raise ModelFileError(f"{path}: truncated ({data.size} bytes, {name} ends at {e['offset'] + e['length']})")
                    array = data[e["offset"] : e["offset"] + e["length"]].view(e["dtype"]).reshape(e["shape"])
                    values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                    if e["shape"] == embedding:
                        self._embedding_pages = (e["offset"], e["length"])
                out[graph][name] = values[key]
        return out

    def _release_embedding_pages(self):
        """Drop the embedding matrix's mapped pages from resident memory. Each token reads one row
        of it, so over a long context the rows touched, and the RSS, would grow with the number of
        distinct tokens seen (up to the whole 113 MB matrix); released, they come back from the
        page cache on the next read (a minor fault per token)."""
        if self._embedding_pages is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        offset, length = self._embedding_pages
        start = offset - offset % mmap.PAGESIZE
        self._mapping.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def _session(self, folder: str, graph: str, threads: int | None, prepack: bool, block: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if block:  # no memory pattern: the block graph's shapes change with T (measured 1100 -> 930 MB
            # peak RSS over 2K tokens of prefill, at the same speed)
            options.enable_mem_pattern = False
        for name, value in self._weights.get(graph, {}).items():
            options.add_initializer(name, value)
        path = os.path.join(folder, graph)
        try:
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types on damaged graphs
            raise ModelFileError(f"{path}: cannot load ({str(e).splitlines()[0][:200]})") from None

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("model_fingerprint")

    @property
    def weights(self) -> str:
        return self.meta.get("weights", "?")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.meta.get("max_position_embeddings")

    @property
    def state_bytes(self) -> int:
        return int(self.meta["state_bytes_per_sequence"])

    def empty_state(self, batch: int = 1) -> OnnxState:
        return OnnxState({n: np.zeros([batch] + s["shape"][1:], np.float32) for n, s in self.meta["state"].items()}, 0)

    def check_state(self, state: OnnxState):
        for name, spec in self.meta["state"].items():
            a = state.tensors.get(name)
            if a is None or list(a.shape[1:]) != spec["shape"][1:] or a.dtype != np.float32:
                raise ValueError(f"state tensor {name}: expected float32 [batch, {', '.join(map(str, spec['shape'][1:]))}]"
                                 f", got {None if a is None else (a.dtype.name, list(a.shape))}")

    def run(self, tokens, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
        """Feed ``tokens`` ([T] or [B, T]) after ``state``: (logits [B, V] of the last token, state).
        The graph is a pure function; its new state replaces the state's arrays (same object)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] == 0:
            raise ValueError("no tokens to run")
        decode = ids.shape == (1, 1) and self.decode_session is not None
        binding = self._decode_binding(state) if decode else None
        if binding is not None:
            binding, outputs, logits = binding
            self._token[...] = ids
            self._position[...] = state.position
            self.decode_session.run_with_iobinding(binding)
            out = [logits.copy()]
            state.tensors = dict(zip(self.state_names, outputs))  # a dict of its own: the caller may edit it
        else:
            feeds = {"input_ids": ids, "position": np.array(state.position, np.int64), **state.tensors}
            out = (self.decode_session if decode else self.session).run(None, feeds)
            state.tensors = dict(zip(self.state_names, out[1:]))
        self._rows_read += ids.size
        if self._rows_read >= RELEASE_EVERY:  # at most this many rows stay resident between releases
            self._release_embedding_pages()
            self._rows_read = 0
        state.position += ids.shape[1]
        return out[0], state

    def _decode_binding(self, state: OnnxState):
        """(IOBinding, the state's next arrays, logits buffer) for one decode step from ``state``,
        or None if its arrays cannot be bound as they are (a batch, another dtype or layout).

        Binding 181 inputs and outputs by name costs ~0.55 ms a call (``session.run`` does it every
        token, about 4% of a step): the bindings are made once for a pair of array sets, the state's
        and a spare, which take turns as input and output; the token and position are bound as
        arrays written in place. So a step writes its new state over the arrays of the step before
        last: as with the other engines, which update a state's arrays in place, keep a
        :meth:`State.copy` to keep a state."""
        tensors, names = state.tensors, self.state_names
        for inputs, outputs, binding, logits in self._bindings:
            if len(tensors) == len(names) and all(tensors.get(n) is a for n, a in zip(names, inputs)):
                return binding, outputs, logits
        current = tuple(tensors.get(n) for n in names)
        if any(a is None or a.dtype != np.float32 or a.shape[0] != 1 or not a.flags.c_contiguous for a in current):
            return None
        spare = tuple(np.empty_like(a) for a in current)
        self._bindings = []
        for inputs, outputs in ((current, spare), (spare, current)):
            logits = np.empty((1, self.meta["vocab_size"]), np.float32)
            binding = bind_decode_step(self.decode_session, self._token, self._position, dict(zip(names, inputs)),
                                       logits, dict(zip(self.meta["outputs"][1:], outputs)))
            self._bindings.append((inputs, outputs, binding, logits))
        return self._decode_binding(state)


def bind_decode_step(session, token: np.ndarray, position: np.ndarray, inputs: dict, logits: np.ndarray,
                     outputs: dict):
    """An IOBinding of a decode graph's ``session``, made once and run every step: ``token`` [1, 1]
    and ``position`` [] int64 (arrays the caller writes in place before each run) and the state
    ``inputs`` {input name: array} read where they are; ``logits`` and ``outputs`` {output name:
    array} written in place. Inputs the graph does not take are left out (graphs cut from the decode
    graph, edge_lolcats.bench.onnx_floors)."""
    taken = {i.name for i in session.get_inputs()}
    binding = session.io_binding()
    for name, array in (("input_ids", token), ("position", position), *inputs.items()):
        if name in taken:
            binding.bind_cpu_input(name, array)
    for name, array in (("logits", logits), *outputs.items()):
        binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
    return binding
