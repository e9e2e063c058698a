"""The CUDA path, on a real GPU: the 4-bit QLoRA learner, a vLLM engine actor receiving the
learner's adapter through Ray, and a colocated run of the whole loop on one GPU.

Run on a GPU machine: `python3 -m pytest -m gpu tests/gpu -s` (CI deselects them with
`-m "not gpu"`). A small Qwen2 shape (4 layers, hidden 512, head_dim 64) keeps them to minutes.
"""
from __future__ import annotations

import gc
import importlib.util
import math
import os
import sys

import pytest
import torch

from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig, RolloutConfig
from grpo_ray.contracts import PromptBatch, Sampling, TrainBatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
VOCAB = 1024
LORA = LoraConfig(r=16, alpha=32)


def learner_config(**kw) -> LearnerConfig:
    return LearnerConfig(**{"learning_rate": 5e-3, "max_grad_norm": 1e6, "warmup_ratio": 0.0,
                            "lr_scheduler_type": "constant", "micro_batch_size": 4,
                            "logprob_chunk_size": 64, "backend": "peft", **kw})


HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from grpo_ray.driver.models.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("small-qwen2"), shape=SMALL_SHAPE,
                         dtype="bfloat16", vocab_size=VOCAB, device="cuda"))


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray with the machine's GPU (the shared `ray_local` fixture has 2 CPUs, no GPU)."""
    import ray

    from grpo_ray.cluster.starting import ACTOR_ENV

    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False,
             log_to_driver=True, runtime_env={"env_vars": ACTOR_ENV})
    yield ray
    ray.shutdown()


def random_batch(n_prompts: int, group: int, seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, completions, sampling, advantages = [], [], [], []
    for i in range(n_prompts):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(8, 40, (1,), generator=g)),),
                               generator=g).tolist()
        for j in range(group):
            n = int(torch.randint(1, 32, (1,), generator=g))
            prompts.append(prompt)
            completions.append(torch.randint(3, VOCAB, (n,), generator=g).tolist())
            sampling.append((-7.0 - torch.rand(n, generator=g)).tolist())
            advantages.append(float(torch.randn(1, generator=g)))
    return TrainBatch(prompts, completions, advantages, sampling)


def _naive_logprobs(w, prompts, completions) -> list[list[float]]:
    """Whole-vocabulary logits of the PEFT model's own forward, one unpadded row at a time."""
    out = []
    with torch.no_grad(), w._autocast():
        w.model.eval()
        for p, c in zip(prompts, completions):
            logits = w.model(input_ids=torch.tensor([p + c], device="cuda")).logits[0].float()
            logp = torch.log_softmax(logits[len(p) - 1:len(p) + len(c) - 1], -1)
            out.append(logp.gather(-1, torch.tensor(c, device="cuda")[:, None])[:, 0].tolist())
    return out


@pytest.mark.parametrize("backend,upcast", [
    ("peft", False), ("peft", True), pytest.param("unsloth", False, marks=pytest.mark.skipif(
        not HAS_UNSLOTH, reason="Unsloth is not installed (pip install -e '.[unsloth]')"))],
    ids=["peft", "peft, unquantized in fp32", "unsloth"])
def test_4bit_learner_step_on_cuda(model_path, backend, upcast):
    import bitsandbytes as bnb

    from grpo_ray.learner.worker import LearnerWorker

    w = LearnerWorker(model_path, ModelConfig(), LORA,
                      learner_config(load_in_4bit=True, backend=backend,
                                     upcast_unquantized_to_fp32=upcast),
                      AlgorithmConfig(total_steps=5), max_completion_length=32)
    try:
        print(f"\nlearner: {w.describe()}")
        assert w.describe().startswith("Unsloth 4-bit" if backend == "unsloth"
                                       else "bitsandbytes NF4 + PEFT")
        linear4 = [m for m in w.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(linear4) == 7 * SMALL_SHAPE["num_hidden_layers"]
        state = linear4[0].weight.quant_state
        assert state.quant_type == "nf4"
        if backend == "peft":  # NF4 with double quantization, fp32 LoRA weights
            assert state.nested
            assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in w.params)
            # norms, embeddings and lm_head: fp32 after PEFT's k-bit preparation, else bf16
            frozen = {p.dtype for n, p in w.model.named_parameters()
                      if not p.requires_grad and p.__class__.__name__ != "Params4bit"}
            assert frozen == {torch.float32 if upcast else torch.bfloat16}, frozen

        batch = random_batch(4, 4, seed=0)
        got = w.sequence_logprobs(batch.prompt_ids, batch.completion_ids)
        want = _naive_logprobs(w, batch.prompt_ids, batch.completion_ids)
        gap = max(abs(a - b) for g, n in zip(got, want) for a, b in zip(g, n))
        # chunked fp32 lm_head against autocast's bf16 logits of the naive forward (a wrong
        # position or target would be off by whole nats)
        assert gap < 5e-2, gap

        lora_before = {n: p.detach().clone() for n, p in w.model.named_parameters()
                       if p.requires_grad}
        quant_before = linear4[0].weight.detach().clone()
        stats = w.train_step(batch)
        print(f"4-bit {backend} learner step ({torch.cuda.get_device_name()}): {stats}")
        assert all(math.isfinite(v) for v in stats.values())
        assert stats["peak_memory_gb"] > 0 and stats["num_tokens"] > 0
        from trl.trainer.utils import get_peak_flops
        if get_peak_flops(torch.cuda.get_device_name(), "bfloat16"):  # TRL knows this GPU
            assert 0 < stats["mfu"] < 1  # a fraction (TRL's compute_mfu gives a percentage)
        changed = [n for n, p in w.model.named_parameters()
                   if p.requires_grad and not torch.equal(p, lora_before[n])]
        assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
        assert torch.equal(linear4[0].weight, quant_before)  # the 4-bit base never moves
        after = w.sequence_logprobs(batch.prompt_ids, batch.completion_ids)
        assert max(abs(a - b) for g, n in zip(after, got) for a, b in zip(g, n)) > 1e-4
    finally:
        del w
        gc.collect()
        torch.cuda.empty_cache()


DEFERRED = """
import sys
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.learner.worker import LearnerWorker
w = LearnerWorker(sys.argv[1], ModelConfig(), LoraConfig(r=16, alpha=32),
                  LearnerConfig(backend=sys.argv[2]), AlgorithmConfig(total_steps=5), 32,
                  defer_load=True)
print("imported", flush=True)
sys.stdin.readline()
w.load()
print("loaded", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("backend", ["peft", pytest.param("unsloth", marks=pytest.mark.skipif(
    not HAS_UNSLOTH, reason="Unsloth is not installed (pip install -e '.[unsloth]')"))])
def test_a_deferred_learner_takes_no_gpu_memory_until_it_loads(model_path, backend):
    # placement starts it beside engines that size their KV cache from the memory they see free
    import subprocess

    def used_mib() -> float:  # by every process on the GPU; this one's own is constant here
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    before = used_mib()
    child = subprocess.Popen([sys.executable, "-c", DEFERRED, model_path, backend],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "imported"
        imported = used_mib() - before
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "loaded"
        loaded = used_mib() - before
    finally:
        child.kill()
        child.wait()
    print(f"\ndeferred {backend} learner on {torch.cuda.get_device_name()}: {imported:.0f} MiB "
          f"after its imports, {loaded:.0f} MiB loaded")
    assert imported < 64, imported  # no CUDA context (hundreds of MiB), no weights
    assert loaded > 256, loaded  # and the same measure sees the loaded learner


def test_chunked_logprobs_through_trls_kernel_on_cuda():
    """token_logprobs on CUDA takes TRL's Triton log-softmax (`selective_log_softmax`) for each
    chunk: values and gradients against the full fp64 log_softmax, with bf16 hidden states and
    an fp32 lm_head (PEFT's 4-bit setup) and a temperature, over a 152k vocabulary."""
    from grpo_ray.learner.logprobs import token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, V = 4, 96, 256, 151_936
    hidden = torch.randn(B, T, H, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(V, H, device="cuda", generator=g)).requires_grad_()
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    upstream = torch.randn(B, T, device="cuda", generator=g)
    got = token_logprobs(hidden, weight, targets, chunk_size=100, temperature=0.7)
    (got * upstream).sum().backward()
    got_dh, got_dw = hidden.grad.double(), weight.grad.double()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = ((h64 @ w64.T) / 0.7).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (want * upstream.double()).sum().backward()
    # loose enough for TF32 matmuls (if a library turned them on); a wrong target, position or
    # gradient of the kernel would be off by far more
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-3)
    torch.testing.assert_close(got_dw, w64.grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(got_dh, h64.grad, rtol=2e-2, atol=2e-2)  # bf16 hidden gradient


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4-bit, fp32 lm_head", "bf16"])
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed (pip install -e '.[gpu]')")
def test_liger_loss_kernel_matches_the_chunked_one_on_cuda(model_path, load_in_4bit):
    """learner.loss_kernel=liger (Liger's fused linear GRPO loss) against the chunked path on the
    same learner and rows: loss, KL and every LoRA gradient within bf16's tolerance,
    micro-batches of unequal sizes, importance sampling on."""
    from grpo_ray.learner.worker import LearnerWorker

    w = LearnerWorker(model_path, ModelConfig(dtype="bfloat16"), LORA,
                      learner_config(load_in_4bit=load_in_4bit, micro_batch_size=5,
                                     learning_rate=0.0,  # the 4-bit lm_head's fp32 products
                                     cast_lm_head_to_fp32=load_in_4bit),
                      AlgorithmConfig(total_steps=5, beta=0.04, loss_type="bnpo",
                                      importance_sampling_correction=True),
                      max_completion_length=32, temperature=0.9)
    try:
        _perturb_lora_b(w, seed=3)
        batch = random_batch(3, 4, seed=1)  # 12 rows: micro-batches of 5, 5 and 2
        runs = {}
        for kernel in ["chunked", "liger"]:
            w.set_loss_kernel(kernel)
            stats = w._accumulate_gradients(w._prepare(batch))
            runs[kernel] = stats, {n: p.grad.float().clone()
                                   for n, p in w.model.named_parameters() if p.requires_grad}
        (want, want_grads), (got, got_grads) = runs["chunked"], runs["liger"]
        worst = max((g - want_grads[n]).norm().item() / want_grads[n].norm().item()
                    for n, g in got_grads.items())
        print(f"\nchunked {want}\nliger {got}\nlargest relative gradient difference "
              f"(norm) {worst:.4f}")
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2, abs=1e-4)
        assert got["kl"] == pytest.approx(want["kl"], rel=5e-2, abs=1e-5)
        for n, g in got_grads.items():
            scale = want_grads[n].abs().max().item()
            assert scale > 0, n
            assert (g - want_grads[n]).abs().max().item() < 3e-2 * scale, n
    finally:
        del w
        gc.collect()
        torch.cuda.empty_cache()


def _perturb_lora_b(w, seed: int) -> int:
    """Noise on lora_B (PEFT starts it at zero): the adapter visibly changes the model."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in w.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
    return sum(p.numel() for p in w.params)


def _adapter_files(w, version: int) -> list[str]:
    return sorted(os.listdir(os.path.join(w.adapter._root, f"v{version}")))


def _mean_gap(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = [(x, y) for r, s in zip(a, b) for x, y in zip(r, s)]
    return sum(abs(x - y) for x, y in pairs) / len(pairs)


@pytest.mark.parametrize("merge", [False, True], ids=["lora", "merged"])
def test_engine_actor_receives_the_learners_adapter_through_ray(ray_gpu, model_path, merge):
    from grpo_ray.cluster.engines import EngineGroup
    from grpo_ray.learner.worker import LearnerWorker
    from grpo_ray.rollout.worker import RolloutWorker
    from grpo_ray.cluster.learner import LearnerHandle
    from grpo_ray.config import ClusterConfig
    from grpo_ray.sync.broadcast import AdapterSync

    ray = ray_gpu
    rollout = RolloutConfig(num_generations=4, max_completion_length=16, max_model_len=512,
                            enforce_eager=True, gpu_memory_utilization=0.25, merge_adapter=merge)
    engine = ray.remote(RolloutWorker).options(num_cpus=1, num_gpus=0.5).remote(
        model_path, rollout, LORA.r)
    engines = EngineGroup([engine])
    assert ray.get(engine.ready.remote())
    # bf16 learner (not 4-bit) so that its log-probs and the bf16 engine's can be compared
    learner = ray.remote(LearnerWorker).options(num_cpus=1, num_gpus=0.5).remote(
        model_path, ModelConfig(), LORA, learner_config(load_in_4bit=False),
        AlgorithmConfig(total_steps=5), 16)
    try:
        prompts = PromptBatch([[1, 5, 9, 42, 7], [1, 300, 12, 77]], [[], []], ["", ""], ["", ""])
        base = engines.generate(prompts, Sampling.training(rollout, seed=3))
        assert base.adapter_version == 0 and len(base) == 8
        base_scores = ray.get(engine.score.remote(base.prompt_ids, base.completion_ids))

        num_params = ray.get(learner.__ray_call__.remote(_perturb_lora_b, 0))
        sync = AdapterSync(LearnerHandle(learner, None, ClusterConfig()), engines)
        sync.start()
        stats = sync.send(1)
        print(f"\nsync v1 ({torch.cuda.get_device_name()}, {sync.transport.name}, "
              f"{'merged' if merge else 'LoRA'}): {stats}")
        assert sync.transport.name == "cuda-ipc"  # both actors compute on the one GPU
        assert ray.get(engine.adapter_version.remote()) == 1
        # the engine's digest of what it received (on its GPU) is the learner's of what it sent
        identity = tuple(ray.get(learner.exported_identity.remote()))
        assert identity[0] == 1 and engines.adapter_identities() == [identity]
        assert stats["bytes"] >= 2 * num_params  # bf16 on the wire
        assert stats["bytes"] < 2 * num_params + 65536
        if not merge:  # the weights stayed in memory: only the config went to tmpfs
            assert ray.get(engine.__ray_call__.remote(_adapter_files, 1)) == [
                "adapter_config.json"]
        engine_scores = ray.get(engine.score.remote(base.prompt_ids, base.completion_ids))
        learner_scores = ray.get(learner.sequence_logprobs.remote(base.prompt_ids,
                                                                  base.completion_ids))
        gap, moved = _mean_gap(engine_scores, learner_scores), _mean_gap(engine_scores, base_scores)
        print(f"engine vs learner {gap:.4f}, engine v1 vs v0 {moved:.4f}")
        assert gap < 0.1 and moved > 3 * gap

        # One real update on the engine's own samples, then version 2 reaches the engine.
        out = engines.generate(prompts, Sampling.training(rollout, seed=4))
        assert out.adapter_version == 1
        batch = TrainBatch(out.prompt_ids, out.completion_ids,
                           [1.0, -1.0] * (len(out) // 2), out.sampling_logprobs)
        train = ray.get(learner.train_step.remote(batch))
        assert train["gap_mean_abs_diff"] < 0.1  # rollout and learner agree before the update
        stats = sync.send(2)
        assert ray.get(engine.adapter_version.remote()) == 2
        assert engines.adapter_identities() == [tuple(ray.get(learner.exported_identity.remote()))]
        if merge:  # folded into the weights: no LoRA request at generation
            assert ray.get(engine.__ray_call__.remote(lambda w: w.adapter.request)) is None
        else:
            assert ray.get(engine.__ray_call__.remote(
                lambda w: w.llm.llm_engine.list_loras())) == {2}
        v2_scores = ray.get(engine.score.remote(base.prompt_ids, base.completion_ids))
        assert _mean_gap(v2_scores, engine_scores) > 1e-4
    finally:
        engines.shutdown()
        ray.kill(learner)


def test_colocated_trainer_on_one_gpu(ray_gpu, model_path, tmp_path):
    """Three steps of the whole loop on one GPU (4-bit learner, engine, CUDA IPC sync), with a
    reward a random model earns (longer completions score higher), so every update moves the
    adapter: after each sync the engine's log-probs of a fixed completion move as the learner's
    do (they differ by the 4-bit quantization error, which the change cancels)."""
    from grpo_ray.config import load_config
    from grpo_ray.driver.trainer import Trainer

    cfg = load_config("configs/qwen2.5-3b-gsm8k-1gpu.yaml", [
        f"model.path={model_path}", f"output.dir={tmp_path}", "data.source=synthetic",
        "data.num_synthetic=64", "rollout.prompts_per_step=4", "rollout.num_generations=4",
        "rollout.max_completion_length=32", "rollout.max_model_len=512",
        "rollout.enforce_eager=true", "rollout.gpu_memory_utilization=0.25",
        "lora.r=16", "lora.alpha=32", "learner.micro_batch_size=8",
        "learner.learning_rate=1e-3", "learner.warmup_ratio=0", "algorithm.total_steps=3",
        "reward.num_workers=2", "logging.tensorboard=false",
        "reward.functions=[{name: 'rewards_for_tests:text_length'}]"])
    assert cfg.cluster.colocate and cfg.learner.load_in_4bit
    trainer = Trainer(cfg, print_fn=print).setup()
    try:
        assert trainer.actors.plan.layout == "colocated"
        fixed = ([[1, 5, 9, 42, 7, 11]], [[17, 300, 12, 77, 5, 9, 3, 250]])
        engine_lp = [trainer.engines.score(*fixed)[0][0]]
        learner_lp = [trainer.learner.call("probe", "sequence_logprobs", *fixed)[0]]
        history = []
        for _ in range(cfg.algorithm.total_steps):
            history.append(trainer.run_step())
            engine_lp.append(trainer.engines.score(*fixed)[0][0])
            learner_lp.append(trainer.learner.call("probe", "sequence_logprobs", *fixed)[0])
        assert [m["adapter_version"] for m in history] == [1.0, 2.0, 3.0]
        assert trainer.engines.adapter_versions() == [3]
        assert trainer.sync.transport.name == "cuda-ipc"
        for m in history:
            for key in ["reward/mean", "learner/loss", "learner/peak_memory_gb", "time/generate_s",
                        "time/update_s", "sync/total_s", "sync/bytes", "rollout/tokens_per_s"]:
                assert key in m and math.isfinite(m[key]), key
            assert m["learner/peak_memory_gb"] > 0 and m["reward/std"] > 0
        moved = _mean_gap([learner_lp[-1]], [learner_lp[0]])
        followed = _mean_gap([[e - e0 for e, e0 in zip(engine_lp[-1], engine_lp[0])]],
                             [[x - x0 for x, x0 in zip(learner_lp[-1], learner_lp[0])]])
        print(f"\ncolocated steps ({torch.cuda.get_device_name()}): "
              + "; ".join(f"step {i + 1}: {m['time/step_s']:.2f} s, sync "
                          f"{1000 * m['sync/total_s']:.1f} ms" for i, m in enumerate(history))
              + f"; learner log-probs moved {moved:.4f}, engine's change off by {followed:.4f}")
        assert moved > 1e-3, "three updates with non-zero advantages left the adapter in place"
        assert followed < 0.3 * moved, "the engine's log-probs did not follow the learner's"
    finally:
        trainer.close()


import ray.cloudpickle  # noqa: E402

# Ray's workers cannot import this test module: ship its helpers by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
