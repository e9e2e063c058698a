"""The learner's FLOPs estimate (hand-counted on small cases and on the tiny PEFT model), TRL's
device peaks and MFU as the learner reads them (a check on the TRL pin), and the stopwatch."""
from __future__ import annotations

import time

import pytest
import torch

from grpo_ray.learner.throughput import Stopwatch, linear_params, step_flops


def test_step_flops_by_hand():
    # 10 tokens, 4 of them completions; decoder matmuls of 100 frozen + 6 trainable weights,
    # lm_head of 50. Forward: 2 x 10 x 106 + 2 x 4 x 50 = 2120 + 400 = 2520.
    # Backward: input gradients 2 x 10 x 106 + 2 x 4 x 50, LoRA weight gradients 2 x 10 x 6:
    # 2520 + 120 = 2640. Reference forward: 2 x 10 x 100 + 400 = 2400.
    kw = dict(tokens=10, completion_tokens=4, frozen=100, trainable=6, lm_head=50)
    assert step_flops(**kw, iterations=1, old_pass=False, ref_pass=False) == 2520 + 2640
    assert step_flops(**kw, iterations=1, old_pass=False, ref_pass=True) == 2520 + 2640 + 2400
    assert step_flops(**kw, iterations=2, old_pass=True, ref_pass=True) == (
        2 * (2520 + 2640) + 2520 + 2400)
    assert step_flops(**{**kw, "tokens": 0, "completion_tokens": 0}, iterations=1,
                      old_pass=True, ref_pass=True) == 0


def test_linear_params_of_the_tiny_peft_model(tiny_model_path):
    from helpers import peft_model
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_model_path)
    model = peft_model(tiny_model_path, seed=0, r=8)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    H, I, heads, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = H // heads
    # q, o: H x H; k, v: H x kv x head_dim; gate, up, down: H x I
    per_layer = 2 * H * H + 2 * H * kv * head_dim + 3 * H * I
    # LoRA A (in x 8) and B (8 x out) of the same seven
    lora_per_layer = 8 * (2 * (H + H) + 2 * (H + kv * head_dim) + 3 * (H + I))
    frozen, trainable = linear_params(model.get_base_model().get_decoder())
    assert frozen == c.num_hidden_layers * per_layer
    assert trainable == c.num_hidden_layers * lora_per_layer


def test_trl_peaks_and_mfu_as_the_learner_reads_them():
    """The learner passes `torch.cuda.get_device_name()` and its compute dtype's name, and takes
    TRL's MFU, a percentage, as a fraction."""
    from trl.trainer.utils import compute_mfu, get_peak_flops

    assert get_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert get_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12  # the SXM part's name
    assert get_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert get_peak_flops("NVIDIA H200", "float32") is None  # no MFU for fp32 matmuls
    assert get_peak_flops("Some Unknown Accelerator", "bfloat16") is None
    # 2e14 FLOPs over 1000 tokens in 0.5 s on a 1e15 FLOP/s device: 40%
    assert compute_mfu(flops_per_token=2e14 / 1000, tokens_per_second=1000 / 0.5, world_size=1,
                       peak_flops_per_device=1e15) == pytest.approx(40.0)


def test_stopwatch_sums_its_blocks_on_cpu():
    watch = Stopwatch(torch.device("cpu"))
    for _ in range(2):
        with watch:
            time.sleep(0.02)
    time.sleep(0.05)  # outside: not counted
    assert watch.seconds() == pytest.approx(0.04, abs=0.03)
    assert watch.seconds() < 0.09
