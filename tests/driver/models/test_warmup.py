"""The supervised warm-up: demonstrations in the strict format, a real fine-tune that lowers the
completion loss, a saved directory transformers loads, and determinism for a seed."""
from __future__ import annotations

import random

import pytest
import torch

from grpo_ray.answer_format import extract_xml_answer
from grpo_ray.driver.data.synthetic import synthetic_rows
from grpo_ray.driver.models.warmup import completion_loss, demonstration, sft_warmup, wrong_result
from grpo_ray.reward.functions import parity_strict_format_reward


def strict(text: str) -> bool:
    """The reference recipe's strict format (one-line reasoning, final newline)."""
    return parity_strict_format_reward([], [text]) == [0.5]

ROWS = synthetic_rows(32, seed=5)


def test_demonstration_is_the_strict_format():
    row = {"question": "Tom has 3 pens and gets 4 more. How many pens does Tom have now?",
           "answer": "3 + 4 = 7\n#### 7"}
    text = demonstration(row)
    assert text == "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"
    assert strict(text)
    wrong = demonstration(row, result="9")
    assert wrong == "<reasoning>\n3 + 4 = 9\n</reasoning>\n<answer>\n9\n</answer>\n"
    for r in ROWS:
        assert strict(demonstration(r))
        assert extract_xml_answer(demonstration(r)) == r["answer"].split("####")[1].strip()


def test_wrong_result_is_near_never_gold_never_negative():
    rng = random.Random(0)
    for gold in ["0", "1", "7", "81"]:
        drawn = {int(wrong_result(gold, rng)) for _ in range(200)}
        assert int(gold) not in drawn and min(drawn) >= 0
        assert max(abs(v - int(gold)) for v in drawn) == 3
    assert {int(wrong_result("0", rng)) for _ in range(200)} == {1, 2, 3}
    with pytest.raises(ValueError, match="'1,000'"):
        wrong_result("1,000", rng)


def test_bad_rows_raise():
    with pytest.raises(ValueError, match="'####'"):
        demonstration({"question": "q", "answer": "no marker"})
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        demonstration({"prompt": "q"})


def _loss(path: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return completion_loss(model, AutoTokenizer.from_pretrained(path), ROWS).item()


@pytest.fixture
def one_torch_thread():
    """The same thread count for two runs (identical float sums); the suite's count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_warmup_lowers_loss_saves_loadable_and_is_deterministic(tiny_model_path, tmp_path,
                                                                     one_torch_thread):
    from transformers import AutoModelForCausalLM

    before = _loss(tiny_model_path)
    a = sft_warmup(tiny_model_path, str(tmp_path / "a"), ROWS, steps=60, batch_size=8, seed=1)
    after = _loss(str(a))
    # random init is ~ln(vocab) = 6.9 per token; 60 steps reach 1.8 (the fixed XML tokens)
    assert before > 5.0 and after < 0.5 * before
    b = sft_warmup(tiny_model_path, str(tmp_path / "b"), ROWS, steps=60, batch_size=8, seed=1)
    ma, mb = (AutoModelForCausalLM.from_pretrained(str(p)) for p in (a, b))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    for (name, pa), pb, p0 in zip(ma.named_parameters(), mb.parameters(), base.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, p0), f"{name} did not change: every weight is trained"


def test_sft_warmup_rejects_bad_arguments(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="correct_prob"):
        sft_warmup(tiny_model_path, str(tmp_path), ROWS, steps=1, correct_prob=1.5)
    with pytest.raises(ValueError, match="no rows"):
        sft_warmup(tiny_model_path, str(tmp_path), [], steps=1)


@pytest.mark.parametrize("columns", [150, 0], ids=["sized", "no window size"])
def test_sft_warmup_shows_its_progress_on_a_terminal(tiny_model_path, tmp_path, columns):
    """On any terminal, one that reports no size too (as `script` gives: it showed no bar for
    the warm-up's minute)."""
    import re
    import sys

    from helpers import run_in_terminal

    code = ("from grpo_ray.driver.models.warmup import sft_warmup\n"
            f"sft_warmup({tiny_model_path!r}, {str(tmp_path / 'w')!r}, {ROWS!r}, steps=3, "
            "batch_size=2, progress=True)\n")
    rc, out = run_in_terminal([sys.executable, "-c", code], timeout=120, columns=columns)
    assert rc == 0, out
    # drawn (tqdm redraws at most every 0.1 s, and clears the bar when done: leave=False)
    assert re.search(r"warm-up:\s+\d+%\|.*\| [0-3]/3 \[", out), out


def test_the_warm_model_says_what_it_builds_before_building(monkeypatch, tmp_path, capsys):
    """The demo's first run spends about a minute here: one line first says what and for how
    long."""
    import grpo_ray.driver.models.resolve as resolve
    import grpo_ray.driver.models.warmup as warmup
    from grpo_ray.config import load_config

    said_before = []

    def warm_up(base, out, rows, **kwargs):  # the minute of training: not this test's concern
        from pathlib import Path

        said_before.append(capsys.readouterr().out)
        (tmp_path / "built").mkdir()
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setenv("GRPO_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(warmup, "warm_up", warm_up)
    monkeypatch.setattr(resolve, "tiny_model", lambda seed: tmp_path / "base")
    cfg = load_config("configs/learn-cpu.yaml")
    path = resolve.resolve_model_path(cfg)
    assert (tmp_path / "built").is_dir() and str(path).startswith(str(tmp_path / "cache"))
    assert said_before[0].startswith("model.path=builtin:tiny-warm: building it once "
                                     "(supervised warm-up of the tiny model, 1200 steps, about a "
                                     "minute")
