"""File formats shared with distributed-llama: `.m` models, `.t` tokenizers, block float types."""
