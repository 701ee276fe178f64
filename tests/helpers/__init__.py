"""Test helpers that are not oracles: where the golden data is (golden), in-process dllama workers
and kernel choice (dllama), Hugging Face tokenizer and chat-model builders (hf), GGUF files and
vocabularies written with the gguf package (gguf_files, gguf_vocab), and taps on what the engine
computes on its way to the logits (taps)."""
