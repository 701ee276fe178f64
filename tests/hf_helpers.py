"""Small Hugging Face artefacts built inside tests: a byte-level BPE tokenizer trained with the
`tokenizers` library (Llama 3 style specials, BOS post-processor, chat template)."""
from __future__ import annotations

import json

TRAIN = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "Café crème brûlée, naïve façade, jalapeño, Ångström.",
         "東京は日本の首都です。北京欢迎你。서울특별시",
         "Emoji: 😀🎉👍🏽 and ❤️ hearts.",
         "   leading spaces,\ttabs\t\tand\n\nnewlines   \n",
         "def f(x):\n    return x ** 2  # comment\n",
         "Numbers 1234567 and 3.14159, 2024-01-01."] * 20
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>"]
# Texts without whitespace runs: one pre-token per word, where dllama's unsplit merge loop
# reproduces HF (see dllama_encode). Whitespace runs: HF's regex gives the run's last space to
# the next word, dllama does not split, so ids differ there (documented, asserted below).
PLAIN = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "Café crème brûlée, naïve façade, jalapeño, Ångström.",
         "東京は日本の首都です。北京欢迎你。서울특별시", "Emoji: 😀🎉👍🏽 and ❤️ hearts.",
         "Numbers 1234567 and 3.14159, 2024-01-01.", "unseen wordsmithery zebra", "naïve café 東京 😀",
         "xxxxxxxxxx", "ÅÅÅ", "1234567890", "a\tb\nc"]
WHITESPACE_RUNS = ["   leading spaces,\ttabs\t\tand\n\nnewlines   \n",
                   "def f(x):\n    return x ** 2  # comment\n", "  multiple   spaces  "]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A $B", special_tokens=[(SPECIALS[0], bos)])
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [tok.token_to_id(SPECIALS[1]),
                                               tok.token_to_id(SPECIALS[2])]}))
    return tok


