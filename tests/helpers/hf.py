"""Small Hugging Face artefacts built inside tests: a byte-level BPE tokenizer trained with the
`tokenizers` library (Llama 3 style specials, BOS post-processor, chat template), a random tiny
Llama converted with it (the chat pair), and transformers' float64 logits as the reference.
torch, transformers and tokenizers are imported only inside the functions that need them."""
from __future__ import annotations

import json

import numpy as np

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


# Llama 3's pre-tokenizer split (words, 1-3 digit groups, punctuation runs, whitespace).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(folder, style: str = "gpt2"):
    """style "gpt2": ByteLevel's own regex; "llama3": Llama 3's Split regex + ByteLevel without
    regex, and ignore_merges (a whole pre-token found in the vocabulary is taken as is)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    if style == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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


def build_chat_pair(folder, seq_len: int = 512, weights: str = "f32"):
    """A random tiny Llama whose vocabulary is build_tokenizer's, converted with the CLI.
    Returns (model_path, tokenizer_path, hf_tokenizer)."""
    import torch
    import transformers

    from dairllm.cli import main

    hf_dir = folder / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf = build_tokenizer(hf_dir)
    eos = [hf.token_to_id(SPECIALS[1]), hf.token_to_id(SPECIALS[2])]
    cfg = transformers.LlamaConfig(
        bos_token_id=hf.token_to_id(SPECIALS[0]), eos_token_id=eos,
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=600, max_position_embeddings=seq_len,
        tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        # Greedy replies of a random model are byte soup; zero the head rows of every token
        # that is not whole UTF-8 text without edge whitespace (and of specials and ids past
        # the tokenizer) so greedy replies are clean text that templates keep verbatim.
        specials = {hf.token_to_id(t) for t in SPECIALS}
        for i in range(cfg.vocab_size):
            text = hf.decode([i]) if i < hf.get_vocab_size() and i not in specials else ""
            if not text or "\ufffd" in text or text != text.strip():
                model.lm_head.weight[i].zero_()
    model.save_pretrained(hf_dir)
    assert hf.get_vocab_size() <= cfg.vocab_size
    assert main(["convert", str(hf_dir), "-o", str(folder / "m.m"), "--weights", weights,
                 "--quiet"]) == 0
    assert main(["convert-tokenizer", str(hf_dir), "-o", str(folder / "t.t")]) == 0
    return folder / "m.m", folder / "t.t", hf


def hf_logits(folder, model_class: str, tokens) -> np.ndarray:
    """transformers' float64 logits of the checkpoint in `folder` (eager attention and experts)."""
    import torch
    import transformers
    cls = getattr(transformers, model_class)
    model = cls.from_pretrained(folder, attn_implementation="eager",
                                experts_implementation="eager").to(torch.float64).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def row_errors(ours, want):
    """||ours - want|| / ||want|| per row (want: transformers' logits)."""
    return np.linalg.norm(ours - want, axis=1) / np.linalg.norm(want, axis=1)
