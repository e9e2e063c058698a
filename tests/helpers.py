"""Helpers shared by the tests: the tiny model as plain transformers and PEFT models, their
log-probabilities computed naively, chat prompts, and an engine test double that knows which
model it serves. Importable from every test (tests/ is on sys.path, see conftest.py)."""
from __future__ import annotations

import json

import torch

from grpo_ray.config import ALL_PROJECTIONS

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 6 pens. How many pens are in 2 boxes?"]


def hf_model(path: str, dtype=torch.float32):
    """The tiny model as a plain transformers model, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def peft_model(path: str, seed: int, r: int = 8, alpha: int = 16, **extra):
    """The tiny model with a LoRA adapter on all seven projections whose B is random (nonzero),
    as after training."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL_PROJECTIONS,
                        init_lora_weights=False, **extra)
    return get_peft_model(hf_model(path), config).eval()


@torch.no_grad()
def naive_logprobs(model, prompt: list[int], completion: list[int],
                   temperature: float = 1.0) -> list[float]:
    """log p(completion[t] | prompt, completion[:t]) from one unpadded forward of `model`."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def max_gap(rows_a: list[list[float]], rows_b: list[list[float]]) -> float:
    """Largest absolute difference between two ragged lists of log-probs of the same shape."""
    assert [len(r) for r in rows_a] == [len(r) for r in rows_b]
    return max(abs(a - b) for ra, rb in zip(rows_a, rows_b) for a, b in zip(ra, rb))


def chat_prompts(tokenizer, questions: list[str] = QUESTIONS) -> list[list[int]]:
    """Token ids of `questions` with the recipe's system prompt and the chat template."""
    from grpo_ray.answer_format import chat_ids, chat_messages

    return [chat_ids(tokenizer, chat_messages(q)) for q in questions]


def run_in_terminal(cmd: list[str], timeout: float, env: dict | None = None,
                    columns: int = 150) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as stdin, stdout and stderr, as from a user's shell;
    return its exit code and everything it wrote (carriage returns and escapes included)."""
    import fcntl
    import os
    import pty
    import select
    import signal
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    rows = 50 if columns else 0  # columns 0: a terminal that reports no size at all
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        # until the command exits, then what is left (its children may hold the terminal)
        while proc.poll() is None or select.select([master], [], [], 0.5)[0]:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"{cmd} still running after {timeout} s:\n"
                                     + b"".join(chunks).decode(errors="replace")[-3000:])
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: nothing holds the terminal any more
                    break
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows for `output`: per line, what follows its last carriage
    return (a progress bar redraws itself over the same line), colour escapes removed."""
    import re

    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.replace("\r\n", "\n"))
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


# ---- sync faults, injected into a RolloutWorker through `actor.__ray_call__` ---------------------
def inject(worker, fault: str, persistent: bool = False, old=None) -> None:
    """Make rollout engine `worker` serve something else than the learner's adapter.

    `no-adapter-now`: at once, the base model under the current version and digest: a LoRA
    engine's adapter stays bound in vLLM (its identity intact: only the probe can tell) while its
    LoRA layers hold zeros; a merged engine's base weights are written back behind the merge's
    back (its identity's count of served modules drops). The others act on the next adapter
    load (every load with `persistent`): `no-adapter` loads, then serves the base model as above;
    `previous` ignores the load (the engine keeps the previous version); `old` loads the payload
    `old` (an older version) under the version sent; `zero` / `double` load the adapter with one
    nonzero tensor (a lora_B when training moved one) zeroed / scaled by 2."""
    import dataclasses

    adapter = worker.adapter
    if fault == "no-adapter-now":
        _serve_base(adapter)
        return
    load = adapter.load

    def faulty(payload, *args, **kwargs):
        if not persistent:
            adapter.load = load
        if fault == "previous":
            return 0.0
        if fault == "old":
            payload = dataclasses.replace(old, version=payload.version)
        elif fault in ("zero", "double"):
            payload = _damaged(payload, fault, adapter.device)
        seconds = load(payload, *args, **kwargs)
        if fault == "no-adapter":
            _serve_base(adapter)
        return seconds

    if fault not in ("no-adapter", "previous", "old", "zero", "double"):
        raise ValueError(f"unknown fault {fault!r}")
    adapter.load = faulty


def _serve_base(adapter) -> None:
    if hasattr(adapter, "restore_base"):  # merged weights
        adapter.llm.collective_rpc(_base_weights_back)
    else:
        adapter.llm.collective_rpc(_zero_lora_slot, args=(adapter.request.lora_int_id,))
    adapter.llm.reset_prefix_cache()  # its blocks came from the adapter's weights


def _base_weights_back(worker) -> None:
    """On a merged engine's vLLM worker: every weight the merges target back to its base."""
    from grpo_ray.sync.merged import _set_weight

    modules = dict(worker.get_model().named_modules())
    for name, base in worker._grpo_base.items():
        _set_weight(modules[name.removesuffix(".weight")], base.clone())


def _zero_lora_slot(worker, lora_id: int) -> None:
    """On a LoRA engine's vLLM worker: the slot of adapter `lora_id` zeroed in every LoRA layer,
    as vLLM does for a module the adapter does not name (the adapter stays registered)."""
    manager = worker.get_model().lora_manager
    slot = manager.lora_index_to_id.index(lora_id)
    for layer in manager.modules.values():
        layer.reset_lora(slot)


def _damaged(payload, fault: str, device: str):
    from grpo_ray.contracts import AdapterPayload

    tensors = {k: v.clone() for k, v in payload.materialize(device).items()}
    # a lora_B that training moved (it starts at zero), else any nonzero tensor
    name = min((n for n in tensors if tensors[n].abs().max() > 0),
               key=lambda n: ("lora_B" not in n, n))
    tensors[name] = tensors[name] * (0 if fault == "zero" else 2)
    return AdapterPayload(payload.version, tensors, payload.peft_config, payload.digest)


def inject_into_new_engines(engines, fault: str) -> None:
    """Every engine the group starts from now on has `fault` on every load (a fault that a new
    engine does not cure: the run must end)."""
    start = engines.group.start

    def start_faulty(i: int):
        engine = start(i)
        engine.__ray_call__.remote(inject, fault, True)  # runs before any later call
        return engine

    engines.group.start = start_faulty


# ---- a run's logs ------------------------------------------------------------------------------
def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def figures(out) -> list[dict]:
    """Rewards and learner figures of each step (not timings, sync figures or fault counters)."""
    skip = ("time/", "sync/", "faults/", "rollout/tokens_per_s", "learner/time_",
            "learner/peak_memory")
    return [{k: v for k, v in r.items() if not k.startswith(skip)}
            for r in jsonl(out / "metrics.jsonl")]


def make_worker(path: str, temperature: float = 1.0, lora_b_seed: int | None = 1,
                algorithm: dict | None = None, max_completion_length: int = 12,
                dtype: str = "auto", **learner):
    """A small LoRA learner (LearnerWorker, no Ray) on the model at `path`; lora_b_seed fills
    lora_B with noise so the adapter is not a no-op from the start (PEFT initializes B to zero).
    `learner` overrides LearnerConfig keys, `algorithm` AlgorithmConfig keys."""
    from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
    from grpo_ray.learner.worker import LearnerWorker

    learner = {"learning_rate": 1e-3, "max_grad_norm": 1e6, "warmup_ratio": 0.0,
               "lr_scheduler_type": "constant", "micro_batch_size": 4, "logprob_chunk_size": 7,
               **learner}
    algorithm = AlgorithmConfig(**{"total_steps": 10, **(algorithm or {})})
    w = LearnerWorker(path, ModelConfig(dtype=dtype), LoraConfig(r=4, alpha=8),
                      LearnerConfig(**learner), algorithm,
                      max_completion_length=max_completion_length, temperature=temperature)
    if lora_b_seed is not None:
        g = torch.Generator().manual_seed(lora_b_seed)
        with torch.no_grad():
            for name, p in w.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return w
