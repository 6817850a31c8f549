"""What bounds an ONNX export's decode step on onnxruntime's CPU kernels: the decode graph timed
beside two graphs cut from it, each a floor the whole step cannot go under.

- ``products``: every layer's attention output replaced by its query, and no state: the weights'
  products, the norms, the embedding and the head, nothing of the attention;
- ``upkeep``: the same plus every node the new state needs (the leaving keys' feature maps, S and
  z decayed and updated, the rings and sinks written): the state's upkeep without the attention's
  readout (window scores, phi of the query, the mix); the same work as the decode graph's (past
  layer 0 the keys written follow a residual stream without attention: other numbers, same ops);
- ``decode``: the decode graph as exported.

All three run the way :class:`edge_lolcats.runtime.onnx_engine.OnnxEngine` runs its decode step
(the mapped weights as user initializers, bindings made once, two sets of state arrays taking
turns), in one process, in alternating blocks of steps, so a busy machine slows all three alike.

    python -m edge_lolcats.bench.onnx_floors ONNX_FOLDER [--rounds N]

No torch here.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

PARTS = ("products", "upkeep", "decode")


def cut_decode_graph(model, part: str):
    """``model`` (the decode graph, an onnx.ModelProto, weights external) cut down to ``part``
    (see the module docstring); a new ModelProto. Layers are found by the names the compact graph
    builder gives them: ``l{i}.attn_merged`` reads the attention's output, ``l{i}.qkv_split``'s first
    output is the query (the same shape)."""
    import onnx

    if part not in PARTS:
        raise ValueError(f"part {part!r}: one of {', '.join(PARTS)}")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    if part == "decode":
        return cut
    graph = cut.graph
    nodes = {n.name: n for n in graph.node}
    layers = sorted(int(name[1:].split(".")[0]) for name in nodes if name.endswith(".attn_merged"))
    if not layers:
        raise ValueError("not a compact decode graph (no l{i}.attn_merged nodes)")
    for i in layers:
        split = nodes.get(f"l{i}.qkv_split")
        if split is None:
            raise ValueError(f"layer {i}: no l{i}.qkv_split node")
        nodes[f"l{i}.attn_merged"].input[0] = split.output[0]
    keep_outputs = [o for o in graph.output if part == "upkeep" or o.name == "logits"]
    producer = {out: n for n in graph.node for out in n.output if out}
    needed, stack, kept = set(), [o.name for o in keep_outputs], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and node.name not in kept:
            kept.add(node.name)
            stack.extend(i for i in node.input if i)
    ordered = [n for n in graph.node if n.name in kept]  # the graph's order is a topological one
    inputs = [i for i in graph.input if i.name in needed]
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:], graph.output[:], graph.input[:], graph.initializer[:]
    graph.node.extend(ordered)
    graph.output.extend(keep_outputs)
    graph.input.extend(inputs)
    graph.initializer.extend(initializers)
    return cut


class _BoundSteps:
    """A decode graph's session stepped through bindings made once, its state arrays taking turns
    (the engine's own binding, :func:`edge_lolcats.runtime.onnx_engine.bind_decode_step`), from a
    random state."""

    def __init__(self, model, folder: str, weights: dict, threads: int | None, rng):
        import onnxruntime as ort

        from edge_lolcats.arch import state as state_names
        from edge_lolcats.runtime.onnx_engine import bind_decode_step

        options = ort.SessionOptions()
        # loaded from bytes: where its external data lives (the weights come as user initializers)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        if threads:
            options.intra_op_num_threads = threads
        present = {t.name for t in model.graph.initializer}
        for name, value in weights.items():
            if name in present:
                options.add_initializer(name, value)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.nodes = len(model.graph.node)
        state_in = [i for i in self.session.get_inputs() if i.name.startswith("state.")]
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.token, self.position = np.zeros((1, 1), np.int64), np.zeros((), np.int64)
        first = [np.abs(rng.standard_normal(i.shape)).astype(np.float32) * 0.1 for i in state_in]
        second = [np.empty_like(a) for a in first]
        self.logits = np.empty(outputs["logits"].shape, np.float32)
        self.bindings = [
            bind_decode_step(self.session, self.token, self.position, {i.name: a for i, a in zip(state_in, a_set)},
                             self.logits, {state_names.output_name(i.name): b for i, b in zip(state_in, b_set)
                                           if state_names.output_name(i.name) in outputs})
            for a_set, b_set in ((first, second), (second, first))]
        self.at = 600  # past the window and the sinks: every path of the step is taken

    def block(self, steps: int) -> float:
        """ms per step over ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.token[0, 0] = 100 + self.at % 1000
            self.position[()] = self.at
            self.session.run_with_iobinding(self.bindings[self.at % 2])
            self.at += 1
        return 1e3 * (time.perf_counter() - t0) / steps


def decode_floors(folder: str, rounds: int = 40, block: int = 10, threads: int | None = None) -> dict:
    """{part: {"nodes": n, "ms": median ms per step, "q1": first quartile}} for the export in
    ``folder``, the parts timed in alternating blocks of ``block`` steps (``rounds`` each)."""
    import onnx

    from edge_lolcats.runtime.onnx_engine import OnnxEngine

    engine = OnnxEngine(folder, threads=threads)
    graph_file = engine.meta.get("decode_graph")
    if not graph_file:
        raise ValueError(f"{folder}: an export without a decode graph")
    model = onnx.load(os.path.join(folder, graph_file), load_external_data=False)
    weights = engine._weights.get(graph_file, {})
    rng = np.random.default_rng(0)
    steps = {part: _BoundSteps(cut_decode_graph(model, part), folder, weights, threads, rng) for part in PARTS}
    del engine
    times = {part: [] for part in PARTS}
    for s in steps.values():
        s.block(3 * block)  # warm: first-touch of arenas and pre-packed weights
    for r in range(rounds):
        for part in (PARTS if r % 2 == 0 else PARTS[::-1]):
            times[part].append(steps[part].block(block))
    out = {}
    for part, ts in times.items():
        ts.sort()
        out[part] = {"nodes": steps[part].nodes, "ms": ts[len(ts) // 2], "q1": ts[len(ts) // 4]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edge_lolcats.bench.onnx_floors", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="an ONNX export (edge-lolcats export --format onnx)")
    p.add_argument("--rounds", type=int, default=40, help="blocks of 10 steps timed per graph")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = decode_floors(args.folder, rounds=args.rounds, threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return
    print("| graph | nodes | ms per token (median) | first quartile |\n|---|---|---|---|")
    for part, r in result.items():
        print(f"| {part} | {r['nodes']} | {r['ms']:.2f} | {r['q1']:.2f} |")


if __name__ == "__main__":
    main()
