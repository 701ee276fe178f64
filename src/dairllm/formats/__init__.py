"""File formats: distributed-llama's `.m` models and `.t` tokenizers, GGUF files, block float types."""
