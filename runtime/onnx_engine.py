"""onnxruntime engine over an ONNX export (``model.onnx`` + ``model.json``). No torch.

The state is a dict of numpy arrays named as in the graph (``state.{i}.kv`` ...) plus the
position; every call is ``(tokens, position, state) -> (logits of the last token, new state)``.
"""
from __future__ import annotations

import json
import os
import numpy as np

from ..gguf_io import ModelFileError
from ..tokenizer import Tokenizer
from .state import State as OnnxState


class OnnxEngine:
    def __init__(self, folder: str, threads: int | None = None):
        import onnxruntime as ort

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
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        graph = os.path.join(folder, self.meta["graph"])
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types on damaged graphs
            raise ModelFileError(f"{graph}: cannot load ({str(e).splitlines()[0][:200]})") from None
        self.state_names = self.meta["inputs"][2:]
        graph_inputs = {i.name: i.shape for i in self.session.get_inputs()}
        for name, spec in self.meta["state"].items():
            shape = graph_inputs.get(name)
            if shape is None or [d if isinstance(d, int) else "batch" for d in shape] != spec["shape"]:
                raise ModelFileError(f"{folder}: state {name} is {shape} in the graph, {spec['shape']} in model.json")
        self.tokenizer = Tokenizer.from_folder(folder, eos_token_ids=self.meta.get("eos_token_ids"))

    format = "onnx"

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
        feeds = {"input_ids": ids, "position": np.array(state.position, np.int64), **state.tensors}
        out = self.session.run(None, feeds)
        state.tensors = dict(zip(self.state_names, out[1:]))
        state.position += ids.shape[1]
        return out[0], state
