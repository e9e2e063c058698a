"""Export: a tiny model's adapter merged into the base gives the adapter model's logits, loads in
plain transformers and in vLLM (through `grpo-ray eval`, this file's one engine); the Hub upload
takes its token from the environment and never shows it (HfApi's methods are replaced by
recorders: no network here); a failed write leaves no partial directory."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from grpo_ray.config import ALL_PROJECTIONS
from grpo_ray.driver.export import ExportError, merge_adapter, push_to_hub, write_directory
from grpo_ray.sync.files import read_adapter, write_adapter
from grpo_ray.sync.sender import adapter_payload

SECRET = "hf_SeCrEt0123456789abcdefTOKEN"
IDS = torch.tensor([[5, 17, 42, 300, 7, 99, 12, 64]])


def _base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def adapter(tiny_model_path, tmp_path_factory):
    """A rank-8 adapter with random A and B (as after training), saved the way training does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_base(tiny_model_path), LoraConfig(
        r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, init_lora_weights=False))
    with torch.no_grad():  # PEFT's random init is small: make the update clearly visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("export") / "adapter"
    return write_adapter(adapter_payload(model, version=1), path)


@pytest.fixture(scope="module")
def merged(tiny_model_path, adapter):
    return merge_adapter(tiny_model_path, str(adapter), str(adapter.parent / "merged"),
                         dtype="float32")


def test_read_adapter_inverts_write_adapter(adapter, tmp_path):
    payload = read_adapter(adapter, version=4)
    again = read_adapter(write_adapter(payload, tmp_path / "copy"))
    assert payload.version == 4 and again.version == 1
    assert payload.peft_config == again.peft_config and payload.peft_config["r"] == 8
    assert payload.tensors.keys() == again.tensors.keys() and len(payload.tensors) == 28
    assert all(torch.equal(payload.tensors[k], again.tensors[k]) for k in payload.tensors)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        read_adapter(tmp_path)


@torch.no_grad()
def test_merged_logits_equal_the_adapter_models(tiny_model_path, adapter, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # no PEFT involved
    assert type(plain).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in n for n in plain.state_dict())
    assert plain.dtype == torch.float32 and (merged / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(merged).chat_template  # the tokenizer came along

    with_adapter = PeftModel.from_pretrained(_base(tiny_model_path), str(adapter)).eval()
    expected = with_adapter(input_ids=IDS).logits
    assert torch.allclose(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    # and the adapter matters: the base alone is far from it
    assert (_base(tiny_model_path)(input_ids=IDS).logits - expected).abs().max() > 1e-2


def test_merge_defaults_to_bfloat16(tiny_model_path, adapter, tmp_path):
    from safetensors.torch import load_file

    out = merge_adapter(tiny_model_path, str(adapter), str(tmp_path / "bf16"))
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_merged_model_runs_in_vllm_like_the_adapter_model(ray_local, tiny_model_path, adapter,
                                                         merged, tmp_path):
    """`grpo-ray eval` on the merged directory (vLLM, no LoRA applied) answers greedily what
    transformers' greedy decoding of the base + adapter answers."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from grpo_ray.cli import main
    from grpo_ray.config import load_config
    from grpo_ray.driver.evaluation import held_out_batch

    args = [f"output.dir={tmp_path}", f"model.path={merged}", "eval.num_samples=3",
            "eval.max_tokens=12"]
    assert main(["eval", "--config", "configs/tiny-cpu.yaml", *args]) == 0
    report = json.loads((tmp_path / "eval-base.jsonl").read_text().splitlines()[-1])
    assert report["adapter"] is None and report["metrics"]["adapter_version"] == 0

    tokenizer = AutoTokenizer.from_pretrained(merged)
    batch = held_out_batch(load_config("configs/tiny-cpu.yaml", args), tokenizer)
    model = PeftModel.from_pretrained(_base(tiny_model_path), str(adapter)).eval()
    for ids, sample in zip(batch.prompt_ids, report["samples"]):
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
        text = tokenizer.decode(out, skip_special_tokens=True)
        if "</answer>" in text:  # the engine stops there
            text = text[:text.index("</answer>") + len("</answer>")]
        assert sample["completion"] == text


def test_push_needs_a_token(adapter, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ExportError, match="needs a Hugging Face write token in HF_TOKEN"):
        push_to_hub(str(adapter), "me/model")


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo and upload_folder replaced by recorders of their calls."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        logging.getLogger("huggingface_hub").info("creating %s", repo_id)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    return calls


def test_export_command_merges_and_pushes_without_showing_the_token(
        hub, tiny_model_path, adapter, tmp_path, capsys, caplog):
    from grpo_ray.cli import main

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "merged"
    rc = main(["export", "--config", "configs/tiny-cpu.yaml", "--adapter", str(adapter),
               "--merge", "--out", str(out), "--dtype", "float16", "--push-to-hub", "me/model",
               f"output.dir={tmp_path}", f"model.path={tiny_model_path}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert [c[:3] for c in hub] == [("create_repo", SECRET, "me/model"),
                                    ("upload_folder", SECRET, "me/model")]
    assert hub[0][3]["private"] is True and hub[0][3]["exist_ok"] is True
    assert hub[1][3]["folder_path"] == str(out) and (out / "config.json").is_file()
    assert "https://huggingface.co/me/model" in captured.out
    assert SECRET not in captured.out + captured.err + caplog.text


def test_adapter_export_and_a_failed_push_keep_the_token_out(hub, monkeypatch, tiny_model_path,
                                                            adapter, tmp_path, capsys):
    import huggingface_hub

    from grpo_ray.cli import main

    out = tmp_path / "adapter-out"
    rc = main(["export", "--config", "configs/tiny-cpu.yaml", "--adapter", str(adapter),
               "--out", str(out), "--push-to-hub", "me/lora", f"model.path={tiny_model_path}",
               f"output.dir={tmp_path}"])
    assert rc == 0 and hub[1][3]["folder_path"] == str(out)
    assert {"adapter_config.json", "adapter_model.safetensors",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}

    def refused(self, **kwargs):
        raise RuntimeError(f"401 Unauthorized: Authorization: Bearer {SECRET}")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refused)
    rc = main(["export", "--config", "configs/tiny-cpu.yaml", "--adapter", str(adapter),
               "--push-to-hub", "me/lora", f"model.path={tiny_model_path}",
               f"output.dir={tmp_path}"])
    captured = capsys.readouterr()
    assert rc == 2 and "push to me/lora failed: RuntimeError: 401 Unauthorized" in captured.err
    assert "Bearer ***" in captured.err and SECRET not in captured.out + captured.err


def test_a_failed_write_leaves_no_partial_directory(tiny_model_path, adapter, tmp_path,
                                                    monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):  # after the model's weights were written
        merge_adapter(tiny_model_path, str(adapter), str(tmp_path / "merged"), "float32")
    assert list(tmp_path.iterdir()) == []

    # a previous export survives a failed rewrite, untouched
    def half_written(d):
        (d / "model.safetensors").write_text("half")
        raise OSError("disk full")

    previous = write_directory(tmp_path / "out", lambda d: (d / "config.json").write_text("{}"))
    with pytest.raises(OSError, match="disk full"):
        write_directory(previous, half_written)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in previous.iterdir()] == ["config.json"]

    # a directory that is not an export is never replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a model or adapter directory"):
        write_directory(tmp_path / "notes", lambda d: None)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_eval_of_an_adapter_on_a_data_file(ray_local, tiny_model_path, adapter, tmp_path,
                                           capsys):
    """`grpo-ray eval --adapter DIR` on a local file: the table on stdout, and one JSON line
    beside DIR (`eval-<name>.jsonl`, in the schema of training's `eval.jsonl`) naming the
    adapter, with a sample per row of the file; the engine's logs beside it too, not under the
    config's output.dir."""
    import shutil

    from grpo_ray.cli import main

    judged = shutil.copytree(adapter, tmp_path / "adapter")
    rows = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in (2, 3, 4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["eval", "--config", "configs/tiny-cpu.yaml", "--adapter", str(judged),
               "data.source=local", f"data.path={data}", "eval.split=train",
               f"model.path={tiny_model_path}", f"output.dir={tmp_path / 'out'}",
               "eval.num_samples=0", "eval.max_tokens=8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"eval of adapter {judged}" in out and "3 prompts" in out
    assert any(line.startswith("accuracy") for line in out.splitlines()), out
    record = tmp_path / "eval-adapter.jsonl"
    assert f"appended to {record}" in out
    (line,) = record.read_text().splitlines()
    report = json.loads(line)
    assert list(report) == ["time", "step", "tag", "model", "adapter", "adapter_version",
                            "held_out", "judge", "metrics", "sanity", "samples"]
    assert report["adapter"] == str(judged) and report["metrics"]["adapter_version"] == 1
    assert (report["step"], report["tag"], report["adapter_version"]) == (None, "eval", 1)
    assert [s["question"] for s in report["samples"]] == [r["question"] for r in rows]
    assert list((tmp_path / "logs").glob("rollout-0-*.log"))
    assert not (tmp_path / "out").exists()
