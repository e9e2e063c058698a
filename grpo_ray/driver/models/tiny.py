"""Build a tiny Qwen2-architecture model and its tokenizer from nothing (no hub access needed).

The tokenizer is a byte-level BPE trained in code on arithmetic word problems and the XML answer
schema, with Qwen's chat template and special tokens; digits are split one per token as in Qwen2.
The model has random weights (or the shape of a real model, for GPU benchmarks) and is saved as a
normal Hugging Face directory that transformers, PEFT and vLLM all load.

A model with more embeddings than the tokenizer has tokens (Qwen2.5's 151,936) samples ids the
tokenizer lacks, which vLLM's detokenizer cannot decode: `build_tokenizer(cover_vocab=N)` fills
the BPE vocabulary with `<filler_i>` entries up to N ids. No merge produces them, so text encodes
exactly as before; they only make every id decodable.
"""
from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
XML_TOKENS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]

# The shape of the CPU default: head_dim 64 because vLLM's CPU attention rejects head_dim 16.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
# Qwen2.5-3B-Instruct's shape, for GPU benchmarks with random weights.
QWEN25_3B_SHAPE = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN25_VOCAB = 151936


def _corpus(n: int, seed: int) -> list[str]:
    from grpo_ray.answer_format import SYSTEM_PROMPT
    from grpo_ray.driver.data.synthetic import make_problem

    rng = random.Random(seed)
    lines = [SYSTEM_PROMPT]
    for _ in range(n):
        p = make_problem(rng)
        lines.append(p["question"])
        lines.append(f"<reasoning>\n{p['reasoning']}\n</reasoning>\n<answer>\n{p['answer']}\n</answer>\n")
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0, cover_vocab: int | None = None):
    """A fast tokenizer with Qwen's chat template; `<|im_end|>` is EOS, `<|endoftext|>` is pad.

    `vocab_size` is the BPE training target; `cover_vocab` (>= the trained size) adds filler
    entries so that every id below it decodes and `len(tokenizer) == cover_vocab`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(2000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   unk_token=None, model_max_length=4096)
    fast.add_tokens(XML_TOKENS)
    if cover_vocab is not None:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_with_fillers(fast.backend_tokenizer, cover_vocab),
            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
            model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _with_fillers(tokenizer, size: int):
    """A copy of a BPE `tokenizers.Tokenizer` whose model vocabulary also maps every unused id
    below `size` to `<filler_i>` (added tokens and merges unchanged)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    # Loading numbers added tokens after the model vocabulary unless it holds them: put them in
    # it at their ids, so that they keep those ids once the fillers make the vocabulary larger.
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    if size < len(vocab):
        raise ValueError(f"cover_vocab={size} is below the tokenizer's {len(vocab)} tokens")
    used = set(vocab.values())
    vocab.update({f"<filler_{i}>": i for i in range(size) if i not in used})
    return Tokenizer.from_str(json.dumps(data))


def build_model(tokenizer, shape: dict | None = None, seed: int = 0, dtype: str = "float32",
                vocab_size: int | None = None, device: str = "cpu"):
    """A Qwen2ForCausalLM with random weights of the given shape (TINY_SHAPE by default),
    created directly in `dtype` on `device` (3B parameters initialize in seconds on a GPU,
    minutes in fp32 on a CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(TINY_SHAPE if shape is None else shape)
    vocab = vocab_size or len(tokenizer)
    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=dtype, **shape)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(path: str | Path, shape: dict | None = None, seed: int = 0,
              dtype: str = "float32", vocab_size: int | None = None, device: str = "cpu") -> Path:
    """Build tokenizer + model and save both under `path`; returns the path. With `vocab_size`
    the tokenizer covers that many ids (every id the model can sample decodes)."""
    path = Path(path)
    tokenizer = build_tokenizer(seed=seed, cover_vocab=vocab_size)
    model = build_model(tokenizer, shape=shape, seed=seed, dtype=dtype, vocab_size=vocab_size,
                        device=device)
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--shape", choices=["tiny", "qwen2.5-3b"], default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the weights are initialized")
    args = parser.parse_args(argv)
    if args.shape == "tiny":
        save_tiny(args.path, seed=args.seed, dtype=args.dtype, device=args.device)
    else:
        save_tiny(args.path, shape=QWEN25_3B_SHAPE, seed=args.seed, dtype=args.dtype,
                  vocab_size=QWEN25_VOCAB, device=args.device)
    print(args.path)


if __name__ == "__main__":
    main()
