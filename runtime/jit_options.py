"""What every compiled kernel module shares: numba's options and the quantized formats' block."""
BLOCK = 32  # elements per scale of q8_0 and q4_0 weights, and of quantized activations
# reassoc: reductions vectorise; contract: fused multiply-adds. No nnan/ninf: masks are -inf.
FASTMATH = {"reassoc", "contract"}
JIT = dict(cache=True, fastmath=FASTMATH, nogil=True)
