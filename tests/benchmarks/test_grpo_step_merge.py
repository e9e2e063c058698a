"""benchmarks/grpo_step.py's merge A/B: the in-place merge it times against the product's
(`sync.merged.MergedWeightsExtension.grpo_merge`) writes the same weights. vLLM's CPU backend
repacks its weights, so the A/B itself runs only on a GPU; here both merges run on a module laid
out as vLLM's GPU model is (packed qkv_proj with output_sizes, names as vLLM's), in a stand-in
for vLLM's worker with the extension mixed in."""
from __future__ import annotations

import sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from grpo_step import _merge_in_place  # noqa: E402

from grpo_ray.sync.merged import MergedWeightsExtension  # noqa: E402

HIDDEN, R = 16, 4
SIZES = {"qkv_proj": [16, 8, 8], "o_proj": [16]}


class Linear(torch.nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(sum(sizes), HIDDEN), requires_grad=False)
        self.output_sizes = sizes


class VllmLikeWorker(MergedWeightsExtension):
    """vLLM's worker as the extension sees it (`get_model`), its pristine base already read."""

    def __init__(self) -> None:
        root = torch.nn.Module()
        root.model = torch.nn.Module()
        root.model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        for layer in root.model.layers:
            layer.self_attn = torch.nn.Module()
            for name, sizes in SIZES.items():
                setattr(layer.self_attn, name, Linear(sizes))
        root.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
        self.model = root
        self._grpo_base = {n: p.detach().clone() for n, p in root.named_parameters()}

    def get_model(self) -> torch.nn.Module:
        return self.model


def test_the_in_place_merge_writes_what_the_products_merge_writes():
    torch.manual_seed(0)
    worker = VllmLikeWorker()
    params = dict(worker.model.named_parameters())
    out = {"q_proj": 16, "v_proj": 8, "o_proj": 16}  # k_proj not targeted: its rows stay base
    tensors = {}
    for i in range(2):
        for module, n_out in out.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(R, HIDDEN)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, R)
    base = {n: w.clone() for n, w in worker._grpo_base.items()}

    assert worker.grpo_merge("unused", tensors, 2.0) == 4
    assert worker.grpo_served_modules() == 6  # q and v of qkv_proj, o_proj, in both layers
    product = {n: p.detach().clone() for n, p in params.items()}
    name = "model.layers.1.self_attn.qkv_proj.weight"
    assert not torch.equal(product[name][:16], base[name][:16])  # q merged
    assert torch.equal(product[name][16:24], base[name][16:24])  # k untouched
    for p in params.values():  # what another version left there: the in-place merge overwrites
        p.data.add_(1.0)
    assert worker.grpo_served_modules() == 0  # the product's merge is not served any more

    _merge_in_place(worker, tensors, 2.0)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), product[n], rtol=1e-6, atol=1e-6)
    # as the benchmark runs it, right after the product's merge: its figures compare the two
    figures = _merge_in_place(worker, tensors, 2.0)
    assert figures["in_place_max_rel_diff"] < 1e-6 and figures["in_place_differ_fraction"] < 0.5
    for p in params.values():
        p.data.add_(1.0)
    assert _merge_in_place(worker, tensors, 2.0)["in_place_max_rel_diff"] > 0.01  # it can tell
