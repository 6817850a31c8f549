"""Should the ONNX graph use opset 27's LinearAttention op for its linear part? A measurement.

The hybrid's linear part at decode is: fold the key leaving the window into the state, then read
it with the query, ``S += phi(k_leave) v_leave^T; o = phi(q) S`` (z rides along as a column of ones
appended to v). That is exactly the op's ``update_rule="linear"`` step with q = phi(q_t),
k = phi(k_{t-W}), v = [v_{t-W}, 1]; for prefill, feeding keys and values shifted by W gives the
"older than the window" sum. This script times the op against the same step as two MatMuls and an
Add (what our exported graph does) on SmolLM2's shapes, and checks they agree.

    python -m edge_lolcats.bench.linear_attention_op [--tokens 1,64,512]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _graphs(heads: int, dk: int, dv: int):
    import onnx
    from onnx import TensorProto as TP, helper as h

    f = TP.FLOAT
    io = [h.make_tensor_value_info("q", f, [1, "T", heads * dk]), h.make_tensor_value_info("k", f, [1, "T", heads * dk]),
          h.make_tensor_value_info("v", f, [1, "T", heads * dv]), h.make_tensor_value_info("S", f, [1, heads, dk, dv])]
    state_out = h.make_tensor_value_info("S2", f, [1, heads, dk, dv])
    outs = [h.make_tensor_value_info("o", f, [1, "T", heads * dv]), state_out]
    outs_mm = [h.make_tensor_value_info("o", f, [1, heads, "T", dv]), state_out]
    op = h.make_node("LinearAttention", ["q", "k", "v", "S"], ["o", "S2"], q_num_heads=heads, kv_num_heads=heads,
                     update_rule="linear", scale=1.0)
    g_op = h.make_model(h.make_graph([op], "op", io, outs), opset_imports=[h.make_opsetid("", 27)])
    # the same with plain ops, T = 1: S2 = S + k^T v; o = q S2 (per head)
    shape = lambda name, d: [h.make_node("Reshape", [name, f"{name}_shape"], [f"{name}4"]),  # noqa: E731
                             h.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3])]
    consts = [h.make_tensor(f"{n}_shape", TP.INT64, [4], [1, -1, heads, d]) for n, d in (("q", dk), ("k", dk), ("v", dv))]
    nodes = shape("q", dk) + shape("k", dk) + shape("v", dv) + [
        h.make_node("Transpose", ["kh"], ["kT"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["kT", "vh"], ["kv"]),
        h.make_node("Add", ["S", "kv"], ["S2"]),
        h.make_node("MatMul", ["qh", "S2"], ["o"])]
    g_mm = h.make_model(h.make_graph(nodes, "matmul", io, outs_mm, initializer=consts), opset_imports=[h.make_opsetid("", 18)])
    onnx.checker.check_model(g_op)
    onnx.checker.check_model(g_mm)
    return g_op, g_mm


def measure(tokens=(1,), heads: int = 9, dk: int = 128, dv: int = 65, repeats: int = 300) -> list[dict]:
    import onnxruntime as ort

    g_op, g_mm = _graphs(heads, dk, dv)
    sessions = {name: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
                for name, g in (("LinearAttention (opset 27)", g_op), ("MatMul + Add (opset 18)", g_mm))}
    rng = np.random.default_rng(0)
    rows = []
    for t in tokens:
        feeds = {"q": rng.random((1, t, heads * dk), np.float32), "k": rng.random((1, t, heads * dk), np.float32),
                 "v": rng.random((1, t, heads * dv), np.float32), "S": rng.random((1, heads, dk, dv), np.float32)}
        for name, sess in sessions.items():
            if t > 1 and "MatMul" in name:
                continue  # the plain graph above is the T = 1 step
            out = sess.run(None, feeds)
            t0 = time.perf_counter()
            for _ in range(repeats):
                sess.run(None, feeds)
            ms = 1e3 * (time.perf_counter() - t0) / repeats
            rows.append({"impl": name, "tokens": t, "ms": ms, "out": out})
    if 1 in tokens:  # same numbers
        a, b = [r["out"] for r in rows if r["tokens"] == 1]
        o_mm = b[0].transpose(0, 2, 1, 3).reshape(a[0].shape)
        rows.append({"agree": bool(np.allclose(a[0], o_mm, rtol=1e-4, atol=1e-3) and np.allclose(a[1], b[1], rtol=1e-5))})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,64,512")
    a = p.parse_args()
    for r in measure(tuple(int(x) for x in a.tokens.split(","))):
        print(r if "agree" in r else f"{r['impl']:28s} T={r['tokens']:<4d} {r['ms']:.3f} ms")
