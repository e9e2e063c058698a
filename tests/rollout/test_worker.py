"""RolloutWorker on a real vLLM CPU engine and the tiny model, built directly (no Ray).

One engine serves the whole module (its start and first generation take most of the time);
the tests run in file order: base-model tests first, then adapter versions 1 and 2.
"""
from __future__ import annotations

import os

import pytest
import torch

from grpo_ray.config import ALL_PROJECTIONS, LoraConfig, RolloutConfig
from grpo_ray.weight_sync.adapter import adapter_payload

N, MAX_TOKENS, TOL = 4, 12, 1e-3
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 6 pens. How many pens are in 2 boxes?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from grpo_ray.data.prompts import chat_messages

    texts = [tokenizer.apply_chat_template(chat_messages(q), tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def worker(tiny_model_path):
    from grpo_ray.rollout.worker import RolloutWorker

    rollout = RolloutConfig(num_generations=N, max_completion_length=MAX_TOKENS, max_model_len=512,
                            enforce_eager=True, kv_cache_space_gb=1)
    w = RolloutWorker(tiny_model_path, rollout, LoraConfig(r=8, alpha=16), seed=0)
    yield w
    w.close()


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft(path, seed):
    """The tiny model with a rank-8 adapter whose B is random (nonzero), as after training."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = PeftLoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS,
                            init_lora_weights=False)
    return get_peft_model(_model(path), config).eval()


@torch.no_grad()
def _logprobs(model, prompt, completion, temperature=1.0):
    """log p(completion[t] | prompt, completion[:t]) under `model` -> len(completion) floats."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def _assert_logprobs_match(model, rollout, temperature=1.0):
    for p, c, lp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampling_logprobs):
        expected = _logprobs(model, p, c, temperature)
        assert max(abs(a - b) for a, b in zip(lp, expected)) < TOL


def test_generate_is_prompt_major_with_n_completions(worker, prompts, tokenizer):
    out = worker.generate(prompts, seed=3)
    assert out.adapter_version == 0 and len(out) == 2 * N
    assert out.prompt_index == [0] * N + [1] * N
    assert out.prompt_ids == [prompts[0]] * N + [prompts[1]] * N
    vocab = len(tokenizer)
    for ids, lps, reason, text in zip(out.completion_ids, out.sampling_logprobs,
                                      out.finish_reasons, out.completion_texts):
        assert 1 <= len(ids) <= MAX_TOKENS and all(0 <= t < vocab for t in ids)
        assert len(lps) == len(ids) and all(lp <= 0 for lp in lps)
        assert reason in ("stop", "length")
        if reason == "length":
            assert len(ids) == MAX_TOKENS
        else:
            assert ids[-1] == tokenizer.eos_token_id
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 character.
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert text.rstrip("\ufffd") == decoded.rstrip("\ufffd")
    # A group is n different samples, and the same seed reproduces the whole batch.
    assert len({tuple(ids) for ids in out.completion_ids[:N]}) > 1
    assert worker.generate(prompts, seed=3).completion_ids == out.completion_ids


def test_sampling_logprobs_match_transformers(worker, prompts, tiny_model_path):
    model = _model(tiny_model_path)
    _assert_logprobs_match(model, worker.generate(prompts, n=2, seed=5))
    # processed logprobs: after temperature, as the learner's log_softmax(logits / T)
    _assert_logprobs_match(model, worker.generate(prompts, n=2, temperature=0.7, seed=5), 0.7)


def test_greedy_is_one_argmax_completion_per_prompt(worker, prompts, tiny_model_path):
    out = worker.generate(prompts, temperature=0)
    assert out.prompt_index == [0, 1]
    model = _model(tiny_model_path)
    with torch.no_grad():
        for p, c in zip(out.prompt_ids, out.completion_ids):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            assert logits.argmax(-1).tolist() == c
    # A stop string ends the completion and is kept in it.
    full = out.completion_texts[0]
    stop = full[2:6]
    assert len(stop) == 4
    stopped = worker.generate(prompts[:1], temperature=0, stop=[stop])
    assert stopped.finish_reasons == ["stop"] and len(stopped.completion_ids[0]) < MAX_TOKENS
    text = stopped.completion_texts[0]
    assert text.endswith(stop) and full.startswith(text)
    with pytest.raises(ValueError, match="greedy"):
        worker.generate(prompts, n=2, temperature=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        worker.generate([prompts[0], []])


def test_loaded_adapter_changes_sampling_and_matches_peft(worker, prompts, tiny_model_path):
    base = worker.generate(prompts, n=2, seed=11)
    peft_model = _peft(tiny_model_path, seed=1)
    seconds = worker.load_adapter(adapter_payload(peft_model, version=1))
    assert seconds > 0 and worker.adapter_version() == 1
    tuned = worker.generate(prompts, n=2, seed=11)
    assert tuned.adapter_version == 1
    assert tuned.sampling_logprobs != base.sampling_logprobs
    _assert_logprobs_match(peft_model, tuned)
    # ... and the adapter's effect is far above the tolerance: the base model disagrees.
    base_model = _model(tiny_model_path)
    gaps = [abs(a - b) for p, c, lp in zip(tuned.prompt_ids, tuned.completion_ids,
                                           tuned.sampling_logprobs)
            for a, b in zip(lp, _logprobs(base_model, p, c))]
    assert max(gaps) > 100 * TOL


def test_stale_version_is_refused(worker, prompts, tiny_model_path):
    payload = adapter_payload(_peft(tiny_model_path, seed=1), version=1)
    with pytest.raises(ValueError, match="version 1 is not newer .* current version 1"):
        worker.load_adapter(payload)
    assert worker.adapter_version() == 1


def test_next_version_replaces_the_previous_one(worker, prompts, tiny_model_path):
    peft_model = _peft(tiny_model_path, seed=2)
    worker.load_adapter(adapter_payload(peft_model, version=2))
    assert worker.adapter_version() == 2
    assert worker.llm.llm_engine.list_loras() == {2}
    assert os.listdir(worker._adapter_root) == ["v2"]
    _assert_logprobs_match(peft_model, worker.generate(prompts, n=2, seed=13))


def test_adapter_dirs_of_dead_workers_are_removed(tmp_path):
    import subprocess
    import sys

    from grpo_ray.rollout.worker import _DIR_PREFIX, _remove_dead_workers_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"{_DIR_PREFIX}{dead}-engine0-x" / "v3").mkdir(parents=True)
    (tmp_path / f"{_DIR_PREFIX}{os.getpid()}-engine1-y" / "v3").mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    _remove_dead_workers_dirs(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f"{_DIR_PREFIX}{os.getpid()}-engine1-y", "unrelated"]
