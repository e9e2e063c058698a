"""LearnerWorker on the tiny model, on CPU, without Ray: log-probs against a naive forward, the
reference pass, gradient accumulation, and what one GRPO step does to the adapter."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import make_worker

from grpo_ray.algo.losses import LOSS_TYPES
from grpo_ray.contracts import TrainBatch


@pytest.fixture(scope="module")
def batch(tiny_model_path) -> TrainBatch:
    """2 prompts x 3 completions of different lengths, advantages of both signs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
               for q in ["What is 2 + 3?", "Tom has 7 apples and eats 4. How many are left?"]]
    g = torch.Generator().manual_seed(0)
    lengths = [5, 12, 1, 9, 3, 7]
    completions = [torch.randint(0, len(tok), (n,), generator=g).tolist() for n in lengths]
    sampling = [(-2.0 - torch.rand(n, generator=g)).tolist() for n in lengths]
    return TrainBatch([prompts[i // 3] for i in range(6)], completions,
                      [1.2, -0.3, -0.9, 0.5, -1.1, 0.6], sampling)


def naive_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    """One unpadded forward per row through the model's own forward and lm_head."""
    from trl.trainer.utils import selective_log_softmax

    out = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completion_ids):
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
            out.append(selective_log_softmax(logits[len(p) - 1:len(p) + len(c) - 1],
                                             torch.tensor(c), temperature).tolist())
    return out


def assert_rows_close(got, want, atol=1e-5):
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=0, atol=atol)


def lora_params(w):
    return {n: p.detach().clone() for n, p in w.model.named_parameters() if p.requires_grad}


def base_params(w):
    return {n: p.detach().clone() for n, p in w.model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("learner", [{"micro_batch_size": 4}, {"max_tokens_per_micro_batch": 132}],
                         ids=["rows", "token budget"])
def test_logprobs_equal_naive_forward_of_the_peft_model(tiny_model_path, batch, learner):
    w = make_worker(tiny_model_path, temperature=0.7, **learner)
    plan = w._plan([len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)])
    assert len(plan) == 2
    if "max_tokens_per_micro_batch" in learner:
        assert plan == [[3, 5, 1], [4, 0, 2]]  # rows of 44, 42, 40 and 38, 33, 29 tokens
    got = w.sequence_logprobs(batch.prompt_ids, batch.completion_ids)
    w.model.eval()
    assert_rows_close(got, naive_logprobs(w.model, batch.prompt_ids, batch.completion_ids, 0.7))


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_reference_is_the_base_model_and_the_adapter_matters(tiny_model_path, batch,
                                                             num_iterations):
    """Old and reference log-probs of every row: from a pass before the update (several
    iterations) or from the update's own micro-batch loop (one)."""
    from transformers import AutoModelForCausalLM

    w = make_worker(tiny_model_path, algorithm={"beta": 0.04, "num_iterations": num_iterations})
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    base = naive_logprobs(plain, batch.prompt_ids, batch.completion_ids)
    current = w.sequence_logprobs(batch.prompt_ids, batch.completion_ids)
    prepared = w._prepare(batch)
    assert prepared.separate_pass == (num_iterations > 1)
    assert all(mb.ref_logp is None for mb in prepared.micro_batches) == (num_iterations == 1)
    if num_iterations == 1:
        w._accumulate_gradients(prepared)
    rows, ref, old = 0, [], []
    for mb in prepared.micro_batches:
        for i in range(mb.mask.size(0)):
            n = int(mb.mask[i].sum())
            ref.append(mb.ref_logp[i, :n].tolist())
            old.append(mb.old_logp[i, :n].tolist())
            rows += 1
    assert rows == len(batch)
    assert_rows_close(ref, base)
    assert_rows_close(old, current)
    diff = max(abs(a - b) for r, o in zip(ref, old) for a, b in zip(r, o))
    assert diff > 1e-3  # nonzero lora_B: the policy is not the reference


def test_train_step_updates_only_the_adapter(tiny_model_path, batch):
    w = make_worker(tiny_model_path,
                    algorithm={"beta": 0.04, "importance_sampling_correction": True})
    lora0, base0 = lora_params(w), base_params(w)
    stats = w.train_step(batch)

    assert set(stats) == {"loss", "grad_norm", "learning_rate", "kl", "clip_fraction",
                          "gap_mean_abs_diff", "gap_kl", "num_tokens", "padding_fraction",
                          "time_logprobs_s", "time_ref_s", "time_update_s", "tflops",
                          "peak_memory_gb", "clip_ratio/low_mean", "clip_ratio/high_mean",
                          "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert stats["num_tokens"] == sum(len(c) for c in batch.completion_ids) == 37
    assert stats["learning_rate"] == 1e-3 and stats["grad_norm"] > 0
    assert stats["kl"] > 0  # the adapter (noise in lora_B) moves the policy off the reference
    assert stats["clip_fraction"] == 0.0  # one iteration: ratio 1
    assert stats["gap_mean_abs_diff"] > 0 and stats["peak_memory_gb"] == 0.0
    # rows of 28 + (5, 12, 1) and 35 + (9, 3, 7) tokens in micro-batches of 4 rows, in order
    assert stats["padding_fraction"] == pytest.approx(
        1 - (33 + 40 + 29 + 44 + 38 + 42) / (4 * 44 + 2 * 42))
    assert 0 < stats["time_ref_s"] <= stats["time_logprobs_s"] and stats["tflops"] > 0
    # TRL's check: every adapter tensor changed, no base weight did.
    lora1, base1 = lora_params(w), base_params(w)
    assert len(lora1) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
    unchanged = [n for n in lora0 if torch.equal(lora0[n], lora1[n])]
    assert not unchanged, f"parameters have not changed: {unchanged}"
    assert all(torch.equal(base0[n], base1[n]) for n in base0)

    payload = w.export_adapter(version=1)
    assert payload.version == 1 and len(payload.tensors) == len(lora1)
    exported = {k.replace(".weight", ".default.weight"): v for k, v in payload.tensors.items()}
    assert all(torch.equal(exported[n], lora1[n]) for n in lora1)


def test_the_gap_of_each_engine_shows_the_one_that_sampled_other_weights(tiny_model_path,
                                                                           batch):
    """Rows 3-5 come from an engine that served the learner's own weights (its log-probs are the
    learner's), rows 0-2 from one that did not: only engine 0's gap is large."""
    import dataclasses

    w = make_worker(tiny_model_path)
    own = w.sequence_logprobs(batch.prompt_ids[3:], batch.completion_ids[3:])
    mixed = dataclasses.replace(batch, sampling_logprobs=batch.sampling_logprobs[:3] + own,
                                engine_index=[0, 0, 0, 1, 1, 1])
    stats = w.train_step(mixed)
    assert stats["gap_kl/engine_1"] < 1e-9 and stats["gap_mean_abs_diff/engine_1"] < 1e-5
    assert stats["gap_kl/engine_0"] > 0.1 and stats["gap_mean_abs_diff/engine_0"] > 0.1
    assert stats["gap_kl/engine_1"] < stats["gap_kl"] < stats["gap_kl/engine_0"]
    with pytest.raises(ValueError, match="TrainBatch.engine_index has 2 rows, completion_ids "
                                         "has 6"):
        w.train_step(dataclasses.replace(batch, engine_index=[0, 1]))


def test_zero_learning_rate_changes_nothing(tiny_model_path, batch):
    w = make_worker(tiny_model_path, learning_rate=0.0)
    lora0 = lora_params(w)
    before = w.sequence_logprobs(batch.prompt_ids, batch.completion_ids)
    stats = w.train_step(batch)
    assert stats["grad_norm"] > 0 and stats["learning_rate"] == 0.0
    assert all(torch.equal(v, lora_params(w)[n]) for n, v in lora0.items())
    assert w.sequence_logprobs(batch.prompt_ids, batch.completion_ids) == before


ACCUMULATION_CASES = {
    **{loss: {"loss_type": loss} for loss in LOSS_TYPES},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "dapo, entropy mask": {"loss_type": "dapo", "top_entropy_quantile": 0.3},
    "dapo, off-policy mask, sequence_mask weights": {
        "loss_type": "dapo", "off_policy_mask_threshold": 0.0,
        "importance_sampling_mode": "sequence_mask", "importance_sampling_cap": 3.0},
}


@pytest.mark.parametrize("algorithm", ACCUMULATION_CASES.values(), ids=ACCUMULATION_CASES.keys())
def test_gradient_accumulation_is_exact_and_masked_rows_count_only_as_rows(
        tiny_model_path, batch, algorithm):
    """Loss, figures and gradients of a batch are the same in one micro-batch, one row at a time
    and in token-budget micro-batches. A masked row (NaN advantage) takes no part but counts in
    the number of sequences, as TRL's batch size: the per-sequence losses come out 6/7 of the
    batch without it, the token means the same."""
    from grpo_ray.algo.losses import policy_loss, token_mean

    algorithm = {"beta": 0.04, "importance_sampling_correction": True, **algorithm}
    masked = TrainBatch(batch.prompt_ids[:3] + [[5, 6]] + batch.prompt_ids[3:],
                        batch.completion_ids[:3] + [[7, 8, 9]] + batch.completion_ids[3:],
                        batch.advantages[:3] + [math.nan] + batch.advantages[3:],
                        batch.sampling_logprobs[:3] + [[-1.0] * 3] + batch.sampling_logprobs[3:],
                        mask=[True] * 3 + [False] + [True] * 3)
    from grpo_ray.config import LearnerConfig

    w = make_worker(tiny_model_path, algorithm=algorithm)
    runs = {}
    for name, batch_, learner in [("without", batch, {"micro_batch_size": 7}),
                                  ("whole", masked, {"micro_batch_size": 7}),
                                  ("rows", masked, {"micro_batch_size": 1}),
                                  ("budget", masked, {"max_tokens_per_micro_batch": 80})]:
        w.learner = LearnerConfig.model_validate({**w.learner.model_dump(), **learner})
        prepared = w._prepare(batch_)
        stats = w._accumulate_gradients(prepared)
        grads = {n: p.grad.clone() for n, p in w.model.named_parameters() if p.requires_grad}
        runs[name] = (len(prepared.micro_batches), prepared.num_sequences, stats, grads)
    assert [runs[k][:2] for k in runs] == [(1, 6), (1, 7), (6, 7), (4, 7)]
    whole, grads = runs["whole"][2:]
    assert any(g.abs().max() > 0 for g in grads.values())
    assert whole["kl"] > 0 and abs(whole["loss"]) > 1e-4
    for name in ["rows", "budget"]:
        stats, split_grads = runs[name][2:]
        assert stats.keys() == whole.keys()
        for k in whole:
            assert stats[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), (name, k)
        for n, g in split_grads.items():
            torch.testing.assert_close(g, grads[n], rtol=1e-4, atol=1e-7, msg=(name, n))
    # the masked row: only its count, in the losses that divide by sequences
    scale = 1.0 if policy_loss(algorithm["loss_type"]).aggregate is token_mean else 6 / 7
    without, without_grads = runs["without"][2:]
    assert whole["loss"] == pytest.approx(without["loss"] * scale, rel=1e-5, abs=1e-7)
    for n, g in without_grads.items():
        torch.testing.assert_close(grads[n], g * scale, rtol=1e-4, atol=1e-7, msg=n)


def test_positive_advantage_raises_the_completion_logprob(tiny_model_path, batch):
    w = make_worker(tiny_model_path, learning_rate=1e-2, algorithm={"beta": 0.0})
    rows = TrainBatch(batch.prompt_ids[:2], batch.completion_ids[:2], [1.0, -1.0],
                      batch.sampling_logprobs[:2])
    before = [sum(r) for r in w.sequence_logprobs(rows.prompt_ids, rows.completion_ids)]
    stats = w.train_step(rows)
    after = [sum(r) for r in w.sequence_logprobs(rows.prompt_ids, rows.completion_ids)]
    assert stats["kl"] == 0.0
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1


def test_all_rows_masked_is_a_step_without_update_and_bad_rows_are_named(tiny_model_path, batch):
    w = make_worker(tiny_model_path, lora_b_seed=None)
    lora0 = lora_params(w)
    none = TrainBatch(batch.prompt_ids, batch.completion_ids, batch.advantages,
                      batch.sampling_logprobs, mask=[False] * len(batch))
    stats = w.train_step(none)
    assert stats["num_tokens"] == 0.0 and stats["loss"] == 0.0
    assert all(torch.equal(v, lora_params(w)[n]) for n, v in lora0.items())
    bad = TrainBatch(batch.prompt_ids, batch.completion_ids, batch.advantages,
                     batch.sampling_logprobs[:1] + [[0.0]] + batch.sampling_logprobs[2:])
    with pytest.raises(ValueError, match=r"sampling_logprobs\[1\]"):
        w.train_step(bad)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] is empty"):
        w.train_step(TrainBatch([[]], [[1]], [1.0], [[0.0]]))


def test_schedule_and_several_iterations(tiny_model_path, batch):
    # Cosine with 2 warmup steps of 10: lr 0, lr/2, lr, then cosine decay.
    w = make_worker(tiny_model_path, learning_rate=1e-2, lr_scheduler_type="cosine",
                    warmup_ratio=0.2, algorithm={"num_iterations": 2, "epsilon": 0.01, "beta": 0.0})
    rows = TrainBatch(batch.prompt_ids[:2], batch.completion_ids[:2], [1.0, -1.0],
                      batch.sampling_logprobs[:2])
    lrs, clip = [], []
    for _ in range(4):
        stats = w.train_step(rows)
        lrs.append(stats["learning_rate"])
        clip.append(stats["clip_fraction"])
    want = [0.0, 5e-3, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 1 / 8))]
    assert lrs == pytest.approx(want, rel=1e-6)
    assert clip[0] == 0.0  # lr 0: the second pass sees ratio 1 as well
    assert clip[2] > 0  # the second pass's ratio leaves [0.99, 1.01] after a 1e-2 step


def test_a_deferred_learner_imports_only_and_loads_the_same_policy(tiny_model_path):
    # what place_actors does on a shared GPU: construct (imports) beside the engines, load after
    from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
    from grpo_ray.learner.worker import LearnerWorker

    args = (tiny_model_path, ModelConfig(), LoraConfig(r=4, alpha=8), LearnerConfig(),
            AlgorithmConfig(total_steps=10), 12)
    deferred = LearnerWorker(*args, defer_load=True)
    assert not hasattr(deferred, "model")  # nothing loaded yet
    assert deferred.load() > 0
    direct = LearnerWorker(*args)
    loaded, expected = deferred.model.state_dict(), direct.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # the same seeded adapter
    assert deferred.describe() == direct.describe()


def test_a_deferred_learner_refuses_a_backend_it_cannot_import_at_once(tiny_model_path,
                                                                       monkeypatch):
    import builtins

    from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
    from grpo_ray.learner.worker import LearnerWorker

    real_import = builtins.__import__

    def no_unsloth(name, *a, **k):  # unsloth needs CUDA: absent here as on a machine without it
        if name.split(".")[0] == "unsloth":
            raise ImportError("No module named 'unsloth'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_unsloth)
    with pytest.raises(ImportError, match=r"^learner.backend=unsloth: cannot import unsloth"):
        LearnerWorker(tiny_model_path, ModelConfig(), LoraConfig(r=4, alpha=8),
                      LearnerConfig(backend="unsloth"), AlgorithmConfig(total_steps=10), 12,
                      defer_load=True)
