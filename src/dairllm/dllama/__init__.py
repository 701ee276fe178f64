"""distributed-llama (dllama) compatibility: wire configs, graph, executor, worker and root.

See ../shared/spec/dllama-compat.md for the protocol; dairllm._net holds the byte-level code.
"""
