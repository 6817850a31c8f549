"""GGUF q8_0 / q4_0 blocks repacked for onnxruntime's MatMulNBits: the same weights, bit for bit,
and the op itself (a one-node graph on this onnxruntime) computes x @ W.T with them."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from edge_lolcats.converters import nbits

TYPES = {8: QT.Q8_0, 4: QT.Q4_0}


def _gguf_matrix(n, k, bits, seed):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = quants.quantize(w, TYPES[bits])
    return raw, quants.dequantize(raw, TYPES[bits]).reshape(n, k)


@pytest.mark.parametrize("bits", [8, 4])
def test_repack_holds_the_gguf_weights_exactly(bits):
    raw, w = _gguf_matrix(7, 96, bits, bits)  # odd rows, three blocks a row
    b, scales = nbits.from_gguf(raw, bits)
    assert b.shape == (7, 3, 32 * bits // 8) and b.dtype == np.uint8 and scales.shape == (7, 3)
    np.testing.assert_array_equal(nbits.dequantize(b, scales, bits), w)


def _matmul_nbits_session(n, k, bits, accuracy_level, b, scales):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [8, 4])
def test_matmul_nbits_computes_with_the_gguf_weights(bits):
    """accuracy_level 1 (float32 activations): the product of the file's weights up to float32
    rounding of K = 96 terms; level 4 (int8 activations, the fast kernels) within the error an
    8-bit quantization of x adds (|x|max / 127 per element: a bound, about 1% of the sums here)."""
    n, k = 40, 96
    raw, w = _gguf_matrix(n, k, bits, 10 + bits)
    b, scales = nbits.from_gguf(raw, bits)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    y = _matmul_nbits_session(n, k, bits, 1, b, scales).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-4)
    y4 = _matmul_nbits_session(n, k, bits, 4, b, scales).run(None, {"x": x})[0]
    step = np.abs(x).max(1, keepdims=True) / 127  # int8 activation rounding (per row, per block at most this)
    assert np.all(np.abs(y4 - exact) <= step * np.abs(w).sum(1)[None] + 1e-4)
