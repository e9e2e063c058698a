"""Loading rows through the real `datasets` loaders, and the seeded, resumable prompt iterator."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_ray.config import DataConfig
from grpo_ray.data.dataset import DataError, PromptIterator, load_rows, load_tokenizer
from grpo_ray.data.prompts import SYSTEM_PROMPT

# The first rows of GSM8K's train split.
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips to friends in May. How many clips did Natalia sell altogether in "
                 "April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she "
               "earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty is saving money for a new wallet which costs $100. Betty has only half "
                 "of the money she needs. Her parents decided to give her $15 for that purpose, "
                 "and her grandparents twice as much as her parents. How much more money does "
                 "Betty need to buy the wallet?",
     "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's "
               "grandparents gave her 15 * 2 = $<<15*2=30>>30.\nThis means, Betty needs "
               "100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]
GOLDS = ["72", "10", "5"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _local(path) -> DataConfig:
    return DataConfig(source="local", path=str(path))


def test_local_jsonl_and_parquet_give_gold_answers(tmp_path):
    jsonl = _write_jsonl(tmp_path / "train.jsonl",
                         [dict(r, extra=i) for i, r in enumerate(GSM8K_ROWS)])
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), parquet)
    for path in (jsonl, parquet):
        rows = load_rows(_local(path))
        assert [r["gold"] for r in rows] == GOLDS
        assert [r["question"] for r in rows] == [r["question"] for r in GSM8K_ROWS]
        assert [r["answer"] for r in rows] == [r["answer"] for r in GSM8K_ROWS]
        assert all(set(r) == {"question", "answer", "gold"} for r in rows)


@pytest.mark.parametrize("bad_row, problem", [
    ({"question": "How many?", "answer": "12 apples"}, "answer has no '####' marker"),
    ({"question": "  ", "answer": "#### 3"}, "'question' is empty"),
    ({"question": "How many?"}, "'answer' is missing"),
    ({"question": "How many?", "answer": "4 + 1 = 5\n####  "},
     "answer has nothing after its '####' marker"),
])
def test_bad_row_names_the_source_and_row(tmp_path, bad_row, problem):
    path = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS[:2] + [bad_row] + GSM8K_ROWS[2:])
    with pytest.raises(ValueError) as err:
        load_rows(_local(path))
    assert str(err.value) == f"data.path={path} row 2: {problem}"


def test_missing_column_and_bad_paths(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"^data.path=.*q.jsonl: no 'answer' column "
                                         r"\(columns: question, solution\)$"):
        load_rows(_local(path))
    with pytest.raises(ValueError, match=r"^data.path=.*rows.csv: unknown file type"):
        load_rows(_local(tmp_path / "rows.csv"))
    with pytest.raises(DataError, match=r"^data.path=.*nowhere.jsonl: file not found$"):
        load_rows(_local(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ValueError, match=r"data.source=local has one split \('train'"):
        load_rows(_local(path), "test")


def test_hub_source_goes_through_load_dataset(tmp_path):
    # No hub here: a local directory laid out as a hub dataset repo takes the same call,
    # load_dataset(name, subset, split=...).
    (tmp_path / "main").mkdir()
    _write_jsonl(tmp_path / "main" / "train.jsonl", GSM8K_ROWS[:2])
    _write_jsonl(tmp_path / "main" / "test.jsonl", GSM8K_ROWS[2:])
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n"
        "  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n---\n")
    cfg = DataConfig(source="hub", name=str(tmp_path), subset="main")
    assert [r["gold"] for r in load_rows(cfg)] == GOLDS[:2]
    assert [r["gold"] for r in load_rows(cfg, cfg.eval_split)] == GOLDS[2:]


# ---- prompt iterator -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def _rows(n: int) -> list[dict[str, str]]:
    return load_rows(DataConfig(num_synthetic=n, seed=1))


def test_prompt_ids_decode_to_the_chat_template(tokenizer):
    rows = load_rows(DataConfig(num_synthetic=4, seed=2))
    it = PromptIterator(rows, tokenizer, batch_size=4, max_prompt_length=256)
    batch = it.next_batch()
    for ids, question, messages in zip(batch.prompt_ids, batch.questions, batch.prompts):
        expected = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                    f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.decode(ids) == expected
        assert messages == [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": question}]
    gold_of = {r["question"]: r["gold"] for r in rows}
    assert batch.answers == [gold_of[q] for q in batch.questions]
    custom = PromptIterator(rows, tokenizer, 2, 256, system_prompt="Answer briefly.")
    assert tokenizer.decode(custom.next_batch().prompt_ids[0]).startswith(
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n")


def test_epochs_cover_every_row_once_and_reshuffle(tokenizer):
    rows = _rows(12)
    it = PromptIterator(rows, tokenizer, batch_size=4, max_prompt_length=256, seed=7)
    epochs = []
    for _ in range(2):
        batches = [it.next_batch() for _ in range(it.batches_per_epoch)]
        assert [len(b) for b in batches] == [4, 4, 4]
        epochs.append([q for b in batches for q in b.questions])
    assert it.epoch == 2
    for order in epochs:
        assert sorted(order) == sorted(r["question"] for r in rows)
    assert epochs[0] != epochs[1]
    perm = list(range(12))
    random.Random(7 + 1).shuffle(perm)
    assert epochs[1] == [rows[i]["question"] for i in perm]


def test_tail_is_dropped_so_batches_never_mix_epochs(tokenizer):
    rows = [dict(r, question=f"{i}: {r['question']}") for i, r in enumerate(_rows(10))]
    it = PromptIterator(rows, tokenizer, batch_size=3, max_prompt_length=256)
    first = [q for _ in range(3) for q in it.next_batch().questions]
    assert len(set(first)) == 9 and it.epoch == 1 and it.position == 0
    assert len(it.next_batch()) == 3


def test_state_dict_round_trip_replays_the_same_batches(tokenizer):
    rows = _rows(10)
    original = PromptIterator(rows, tokenizer, batch_size=3, max_prompt_length=256, seed=5)
    for _ in range(4):  # into the second epoch (3 batches per epoch)
        original.next_batch()
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 5, "num_rows": 10}
    restored = PromptIterator(rows, tokenizer, batch_size=3, max_prompt_length=256, seed=0)
    restored.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(7):
        assert restored.next_batch() == original.next_batch()
    with pytest.raises(ValueError, match="saved with 10 rows, this iterator has 9"):
        PromptIterator(rows[:9], tokenizer, 3, 256).load_state_dict(state)


def test_too_long_prompt_and_too_few_rows(tokenizer):
    rows = _rows(5)
    rows[3] = dict(rows[3], question=rows[3]["question"] + " Think step by step." * 20)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": rows[3]["question"]}]
    length = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
    with pytest.raises(ValueError) as err:
        PromptIterator(rows, tokenizer, batch_size=2, max_prompt_length=length - 1)
    assert str(err.value) == (f"row 3: prompt is {length} tokens with the chat template, above "
                              f"max_prompt_length={length - 1} (1 of 5 rows are too long)")
    PromptIterator(rows, tokenizer, batch_size=2, max_prompt_length=length)
    with pytest.raises(ValueError, match="5 rows cannot fill one batch of 6 prompts"):
        PromptIterator(rows, tokenizer, batch_size=6, max_prompt_length=256)


def test_load_tokenizer_falls_back_to_eos_for_padding(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
