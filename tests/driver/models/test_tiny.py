"""The tokenizer that covers a large model's vocabulary: every id decodes, text encodes as before,
the chat template and the special/XML tokens keep their ids; the model is built in its dtype."""
from __future__ import annotations

import pytest
import torch

from grpo_ray.driver.models.tiny import QWEN25_VOCAB, XML_TOKENS, build_model, build_tokenizer

TEXT = ("<|im_start|>user\nTom has 3 apples and buys 4 more.<|im_end|>\n<|im_start|>assistant\n"
        "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n<|im_end|>")


@pytest.fixture(scope="module")
def tokenizers():
    return build_tokenizer(), build_tokenizer(cover_vocab=QWEN25_VOCAB)


def test_covering_tokenizer_decodes_every_id_and_encodes_as_before(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    small, full = tokenizers
    assert len(full) == QWEN25_VOCAB and len(small) < 1024
    assert full.encode(TEXT) == small.encode(TEXT)
    for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *XML_TOKENS]:
        assert full.convert_tokens_to_ids(t) == small.convert_tokens_to_ids(t) < len(small)
    assert (full.eos_token, full.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert full.decode([QWEN25_VOCAB - 1, len(small)]) == (f"<filler_{QWEN25_VOCAB - 1}>"
                                                          f"<filler_{len(small)}>")
    full.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == QWEN25_VOCAB and loaded.encode(TEXT) == small.encode(TEXT)
    messages = [{"role": "user", "content": "hi"}]
    assert (loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_cover_below_the_trained_size_is_refused():
    with pytest.raises(ValueError, match="cover_vocab=100 is below"):
        build_tokenizer(cover_vocab=100)


def test_model_is_built_in_its_dtype_with_the_covered_vocabulary(tokenizers):
    small, full = tokenizers
    model = build_model(full, dtype="bfloat16", device="cpu")
    assert model.get_input_embeddings().weight.shape[0] == QWEN25_VOCAB
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
