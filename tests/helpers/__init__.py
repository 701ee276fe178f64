"""Test helpers that are not oracles: where the golden data is (golden), in-process dllama workers
and kernel choice (dllama), Hugging Face tokenizer and chat-model builders (hf)."""
