"""NumPy oracles: independent re-statements of the math the tests hold dairllm against.

    forward          float64 forward pass of a `.m` model or of float64 tensors with their GGUF
                     types (Q80 / Q8K activation rounding emulated, or the engine's
                     rounding decisions taken after checking each: EngineRounding)
    dllama_kernels   the kernels the dllama executor calls, in NumPy with dllama's AVX2 exp
    quant            Q40/Q80 blocks: quantize, dequantize, random blocks, the float64 matmul check
    rope             RoPE frequencies and cos/sin tables, with Llama-3.1 scaling

They use dairllm only to read files and block formats (dairllm.formats), never its kernels or engine.
"""
