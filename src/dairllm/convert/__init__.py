"""Hugging Face model folders to distributed-llama files: `hf` (model), `hf_tokenizer`
(tokenizer), `chat_template` (rendering a conversation with the model's own template)."""
