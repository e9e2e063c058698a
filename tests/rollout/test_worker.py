"""RolloutWorker on a real vLLM CPU engine and the tiny model, built directly (no Ray).

The session's engine (`served_engine`) may hold an adapter from another test: every expectation
is computed from the model it serves, and every test loads the next version it needs.
"""
from __future__ import annotations

import os

import pytest
from helpers import chat_prompts, max_gap, naive_logprobs, peft_model

from grpo_ray.contracts import Sampling
from grpo_ray.rollout.worker import engine_kwargs, request_calls
from grpo_ray.sync.sender import adapter_payload

N, MAX_TOKENS, TOL = 4, 12, 1e-3


def sample(n=N, temperature=1.0, seed=None, stop=None, max_tokens=MAX_TOKENS):
    return Sampling(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)


def expected_logprobs(model, rollout, temperature=1.0):
    return [naive_logprobs(model, p, c, temperature)
            for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]


def test_generate_is_prompt_major_with_n_completions(served_engine, tokenizer):
    worker, prompts = served_engine.worker, chat_prompts(tokenizer)
    out = worker.generate(prompts, sample(seed=3))
    assert out.adapter_version == worker.adapter_version() and len(out) == 2 * N
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
    assert worker.generate(prompts, sample(seed=3)).completion_ids == out.completion_ids


def test_texts_decoded_after_generation_equal_vllms_own_detokenization(served_engine,
                                                                      tokenizer):
    """Without stop strings the worker decodes the texts itself after generation (vLLM does not
    detokenize token by token); with one vLLM does. The same seed gives the same tokens either
    way, and a stop string that never occurs leaves vLLM's text whole: the texts must be equal.
    Raw token ids as a prompt make the tiny model emit stray bytes: texts cut mid-character."""
    worker, prompts = served_engine.worker, chat_prompts(tokenizer) + [list(range(10, 30))]
    ours = worker.generate(prompts, sample(n=8, seed=11, max_tokens=64))
    vllms = worker.generate(prompts, sample(n=8, seed=11, max_tokens=64, stop=["\x00never\x00"]))
    assert ours.completion_ids == vllms.completion_ids
    assert ours.sampling_logprobs == vllms.sampling_logprobs
    assert ours.completion_texts == vllms.completion_texts
    assert sum(len(t) for t in ours.completion_texts) > 40  # texts, not empty strings


def test_sampling_logprobs_match_transformers(served_engine, tokenizer):
    worker, prompts = served_engine.worker, chat_prompts(tokenizer)
    out = worker.generate(prompts, sample(n=2, seed=5))
    assert max_gap(out.sampling_logprobs, expected_logprobs(served_engine.model, out)) < TOL
    # processed logprobs: after temperature, as the learner's log_softmax(logits / T)
    out = worker.generate(prompts, sample(n=2, temperature=0.7, seed=5))
    assert max_gap(out.sampling_logprobs,
                   expected_logprobs(served_engine.model, out, 0.7)) < TOL


def test_score_equals_vllms_default_prompt_logprobs(served_engine, tokenizer):
    """`score` asks vLLM for flat log-probs without text: the numbers of its default output."""
    from vllm import SamplingParams

    from grpo_ray.sync.probe import probe_sequences

    worker = served_engine.worker
    prompts, completions = probe_sequences(tokenizer)
    got = worker.score(prompts, completions)
    requests = [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)]
    outputs = worker.llm.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                           temperature=1.0),
                                  lora_request=worker.adapter.request, use_tqdm=False)
    want = [[lp[t].logprob for t, lp in zip(c, o.prompt_logprobs[len(p):])]
            for p, c, o in zip(prompts, completions, outputs)]
    assert got == want and [len(x) for x in got] == [len(c) for c in completions]
    assert all(x < 0 for row in got for x in row)


def test_greedy_is_one_argmax_completion_per_prompt(served_engine, tokenizer):
    import torch

    worker, prompts = served_engine.worker, chat_prompts(tokenizer)
    out = worker.generate(prompts, Sampling.greedy(MAX_TOKENS))
    assert out.prompt_index == [0, 1]
    with torch.no_grad():
        for p, c in zip(out.prompt_ids, out.completion_ids):
            logits = served_engine.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            assert logits.argmax(-1).tolist() == c
    # A stop string ends the completion and is kept in it.
    full = out.completion_texts[0]
    stop = full[2:6]
    assert len(stop) == 4
    stopped = worker.generate(prompts[:1], Sampling.greedy(MAX_TOKENS, stop=[stop]))
    assert stopped.finish_reasons == ["stop"] and len(stopped.completion_ids[0]) < MAX_TOKENS
    text = stopped.completion_texts[0]
    assert text.endswith(stop) and full.startswith(text)
    with pytest.raises(ValueError, match="greedy"):
        sample(n=2, temperature=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        worker.generate([prompts[0], []], sample())


def test_loaded_adapter_changes_sampling_and_matches_peft(served_engine, tokenizer,
                                                           tiny_model_path):
    worker, prompts = served_engine.worker, chat_prompts(tokenizer)
    before = worker.generate(prompts, sample(n=2, seed=11))
    model = peft_model(tiny_model_path, seed=1)
    version = served_engine.load(adapter_payload(model, served_engine.next_version), model)
    assert worker.adapter_version() == version
    tuned = worker.generate(prompts, sample(n=2, seed=11))
    assert tuned.adapter_version == version
    assert tuned.sampling_logprobs != before.sampling_logprobs
    assert max_gap(tuned.sampling_logprobs, expected_logprobs(model, tuned)) < TOL
    # ... and the adapter's effect is far above the tolerance: the base model disagrees.
    from helpers import hf_model

    base = hf_model(tiny_model_path)
    assert max_gap(tuned.sampling_logprobs, expected_logprobs(base, tuned)) > 100 * TOL


def test_stale_version_is_refused_and_the_next_replaces_the_previous(served_engine, tokenizer,
                                                                      tiny_model_path):
    worker = served_engine.worker
    model = peft_model(tiny_model_path, seed=2)
    version = served_engine.load(adapter_payload(model, served_engine.next_version), model)
    with pytest.raises(ValueError, match=f"version {version} is not newer .* current version "
                                         f"{version}"):
        worker.load_adapter(adapter_payload(peft_model(tiny_model_path, seed=3), version))
    assert worker.adapter_version() == version
    assert worker.llm.llm_engine.list_loras() == {version}
    assert os.listdir(worker.adapter._root) == [f"v{version}"]
    out = worker.generate(chat_prompts(tokenizer), sample(n=2, seed=13))
    assert max_gap(out.sampling_logprobs, expected_logprobs(model, out)) < TOL


def test_requests_are_split_so_no_prompt_spans_two_scheduler_steps():
    # 10 prompts of 63 tokens x 8 completions: at most 8 prompts (4032 tokens) per 4096
    assert request_calls([63] * 10, 8, 4096) == [(0, 8), (8, 10)]
    assert request_calls([5000, 10, 10], 1, 4096) == [(0, 1), (1, 3)]
    assert request_calls([], 4, 4096) == []


def test_a_given_kv_cache_size_reaches_vllm_on_a_gpu_only():
    from vllm.engine.arg_utils import EngineArgs

    from grpo_ray.config import RolloutConfig

    given = RolloutConfig(kv_cache_gb=41.5)
    gpu = engine_kwargs(given, 64, "bfloat16", 0, on_cuda=True)
    assert gpu["kv_cache_memory_bytes"] == int(41.5 * 2**30)
    EngineArgs(model="x", **gpu)  # a field of this vLLM's engine arguments, not a typo
    assert "kv_cache_memory_bytes" not in engine_kwargs(given, 64, "bfloat16", 0, on_cuda=False)
    assert "kv_cache_memory_bytes" not in engine_kwargs(RolloutConfig(), 64, "bfloat16", 0,
                                                        on_cuda=True)


def test_a_batch_over_the_cpu_scheduler_budget_samples_as_one_call_would(served_engine,
                                                                         tokenizer):
    """vLLM's CPU engine fails a seeded prompt split over scheduler steps; the worker's calls
    keep every prompt whole, so any batch size runs and seeds give the same draws."""
    from grpo_ray.rollout.worker import CPU_BATCHED_TOKENS

    worker = served_engine.worker
    prompts = chat_prompts(tokenizer) * 40
    n = -(-CPU_BATCHED_TOKENS // sum(len(p) for p in prompts[:2])) + 1
    assert sum(len(p) for p in prompts) * n > 2 * CPU_BATCHED_TOKENS
    out = worker.generate(prompts, sample(n=n, seed=7, max_tokens=4))
    assert len(out) == len(prompts) * n
    alone = worker.generate(prompts[-2:], sample(n=n, seed=7 + len(prompts) - 2, max_tokens=4))
    assert out.completion_ids[-2 * n:] == alone.completion_ids
