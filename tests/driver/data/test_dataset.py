"""Loading rows through the real `datasets` loaders, and the seeded, resumable prompt iterator."""
from __future__ import annotations

import csv
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_ray.answer_format import SYSTEM_PROMPT
from grpo_ray.config import DataConfig
from grpo_ray.driver.data.dataset import DataError, load_rows
from grpo_ray.driver.data.prompts import PromptIterator, load_tokenizer

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


def test_local_jsonl_json_csv_and_parquet_give_gold_answers(tmp_path):
    jsonl = _write_jsonl(tmp_path / "train.jsonl",
                         [dict(r, extra=i) for i, r in enumerate(GSM8K_ROWS)])
    array = tmp_path / "train.json"
    array.write_text(json.dumps(GSM8K_ROWS, indent=2))
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), parquet)
    csv_path = tmp_path / "train.csv"
    with open(csv_path, "w", newline="") as f:  # the answers hold newlines: quoted values
        writer = csv.DictWriter(f, ["question", "answer"])
        writer.writeheader()
        writer.writerows(GSM8K_ROWS)
    for path in (jsonl, array, parquet, csv_path):
        rows = load_rows(_local(path))
        assert [r["gold"] for r in rows] == GOLDS
        assert [r["question"] for r in rows] == [r["question"] for r in GSM8K_ROWS]
        assert [r["answer"] for r in rows] == [r["answer"] for r in GSM8K_ROWS]
        assert all(set(r) == {"question", "answer", "gold", "prompt", "columns"} for r in rows)
        assert all(r["prompt"] is None for r in rows)
    assert [r["columns"] for r in load_rows(_local(jsonl))] == [{"extra": i} for i in range(3)]
    assert [r["columns"] for r in load_rows(_local(parquet))] == [{}, {}, {}]


@pytest.mark.parametrize("bad_row, problem", [
    ({"question": "How many?", "answer": "12 apples"}, "column 'answer' has no '####' marker"),
    ({"question": "  ", "answer": "#### 3"}, "column 'question' is empty"),
    ({"question": "How many?"}, "column 'answer' is missing"),
    ({"question": 7, "answer": "#### 3"}, "column 'question' is not text (int 7)"),
    ({"question": "How many?", "answer": "4 + 1 = 5\n####  "},
     "column 'answer' has nothing after its '####' marker"),
])
def test_bad_row_names_the_source_and_line(tmp_path, bad_row, problem):
    path = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS[:2] + [bad_row] + GSM8K_ROWS[2:])
    with pytest.raises(DataError) as err:
        load_rows(_local(path))
    assert str(err.value) == f"data.path={path} line 3: {problem}"


def test_bad_parquet_row_is_named_by_its_index(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[:2] + [{"question": "Q?", "answer": "7"}]),
                   path)
    with pytest.raises(DataError) as err:
        load_rows(_local(path))
    assert str(err.value) == f"data.path={path} row 2: column 'answer' has no '####' marker"


GOOD = json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})


@pytest.mark.parametrize("name, content, where, problem", [
    ("empty.jsonl", b"", "", "no rows (the file is empty)"),
    ("blank.jsonl", b"\n  \n\n", "", "no rows (the file is only blank lines)"),
    ("comma.jsonl", f'{GOOD}\n\n{{"question": "Q?" "answer": "#### 1"}}\n'.encode(), " line 3",
     "not valid JSON (Expecting ',' delimiter at column 19)"),
    ("cut.jsonl", f'{GOOD}\n{{"question": "Q?", "answ'.encode(), " line 2",
     "not valid JSON (Unterminated string starting at column 20)"),
    ("list.jsonl", f"{GOOD}\n[1, 2]\n".encode(), " line 2",
     "expected a JSON object of columns, got list [1, 2]"),
    ("latin1.jsonl", f"{GOOD}\n".encode() + '{"question": "Caf\xe9?"}\n'.encode("latin-1"),
     " line 2", "not UTF-8 text (byte 18)"),
    ("array.json", f'[\n  {GOOD},\n  {{"question": }}\n]'.encode(), " line 3",
     "not valid JSON (Expecting value at column 16)"),
    ("scalars.json", b"[1]", " row 0", "expected a JSON object of columns, got int 1"),
    ("empty.csv", b"", "", "no rows (the file is empty)"),
    ("wide.csv", b'question,answer\n"Q?","#### 1"\nQ2?,#### 2,extra\n', " line 3",
     "cannot read as CSV (CSV parse error: Expected 2 columns, got 3: Q2?,#### 2,extra)"),
    ("broken.parquet", b"PAR1 not really", "",
     "cannot read as Parquet (Could not open Parquet input source '<Buffer>': Parquet file "
     "size is 15 bytes, smaller than the minimum file footer (8 bytes))"),
])
def test_unreadable_files_are_one_line_naming_file_and_line(tmp_path, name, content, where,
                                                              problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_rows(_local(path))
    message = str(err.value)
    assert "\n" not in message
    if name == "broken.parquet":  # pyarrow's own words vary between versions; ours do not
        assert message.startswith(f"data.path={path}: cannot read as Parquet (")
    else:
        assert message == f"data.path={path}{where}: {problem}"


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(f"\n{GOOD}\n\n   \n" + json.dumps({"question": "Q?", "answer": "1"}) + "\n\n")
    with pytest.raises(DataError, match=r"line 5: column 'answer' has no '####' marker$"):
        load_rows(_local(path))
    path.write_text(f"\n{GOOD}\n\n{GOOD.replace('2 + 2', '3 + 3')}\n\n")
    assert [r["question"] for r in load_rows(_local(path))] == ["What is 2 + 2?",
                                                                "What is 3 + 3?"]


def test_missing_column_and_bad_paths(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "solution": "#### 1"}])
    with pytest.raises(DataError, match=r"^data.path=.*q.jsonl: no 'answer' column "
                                        r"\(columns: question, solution\)$"):
        load_rows(_local(path))
    with pytest.raises(DataError, match=r"^data.path=.*q.jsonl: no 'problem' column, nor a "
                                        r"'prompt' column of chat messages \(columns: "
                                        r"question, solution\)$"):
        load_rows(_local(path).model_copy(update={"question_field": "problem"}))
    with pytest.raises(DataError, match=r"^data.path=.*rows.txt: unknown file type \(expected "
                                        r"one of .jsonl, .json, .csv, .parquet\)$"):
        load_rows(_local(tmp_path / "rows.txt"))
    with pytest.raises(DataError, match=r"^data.path=.*nowhere.jsonl: file not found$"):
        load_rows(_local(tmp_path / "nowhere.jsonl"))
    with pytest.raises(DataError, match=r"data.source=local has one split \('train'"):
        load_rows(_local(path), "test")


# ---- columns and gold --------------------------------------------------------------------------

MATH_ROWS = [
    {"problem": "What is 1/2 + 1/4?", "level": 1,
     "solution": "1/2 + 1/4 = 2/4 + 1/4 = \\boxed{\\frac{3}{4}}."},
    {"problem": "Solve x + 1 = 3.", "level": 2,
     "solution": "Try \\boxed{1}; no: x = 3 - 1, so $x = \\boxed{2}$."},
    {"problem": "Which set?", "level": 3, "solution": "It is \\fbox{\\{1, 2\\}}"},
]


def _math(path, **fields) -> DataConfig:
    fields = {"question_field": "problem", "answer_field": "solution", "gold": "boxed", **fields}
    return DataConfig(source="local", path=str(path), **fields)


def test_boxed_gold_takes_the_last_box_with_nested_braces(tmp_path):
    rows = load_rows(_math(_write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)))
    assert [r["gold"] for r in rows] == ["\\frac{3}{4}", "2", "\\{1, 2\\}"]
    assert [r["question"] for r in rows] == [r["problem"] for r in MATH_ROWS]
    # every column but the reserved ones reaches the rewards, the worked solution included
    assert rows[0]["columns"] == MATH_ROWS[0]


@pytest.mark.parametrize("solution, problem", [
    ("It is 3/4.", "column 'solution' has no \\boxed{...}"),
    ("It is \\boxed{\\frac{3}{4}.", "column 'solution' has no \\boxed{...} (its last one is "
                                    "never closed)"),
    ("It is \\boxed{ }.", "column 'solution' has an empty \\boxed{}"),
])
def test_boxed_gold_problems_name_file_line_and_column(tmp_path, solution, problem):
    path = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS[:2] + [dict(MATH_ROWS[2],
                                                                       solution=solution)])
    with pytest.raises(DataError) as err:
        load_rows(_math(path))
    assert str(err.value) == f"data.path={path} line 3: {problem}"


def test_field_gold_is_the_column_as_is(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is 3/4 as a decimal?", "a": 0.75},
                                                {"q": "What is 10^3?", "a": " 1000 "},
                                                {"q": "Name the interval.", "a": "[1, 2)"}])
    rows = load_rows(DataConfig(source="local", path=path, question_field="q",
                                answer_field="a", gold="field"))
    assert [r["gold"] for r in rows] == ["0.75", "1000", "[1, 2)"]
    assert rows[0]["columns"] == {"q": "What is 3/4 as a decimal?", "a": 0.75}
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"q": "Q?", "a": True}])
    with pytest.raises(DataError, match=r"line 1: column 'a' is not text \(bool True\)$"):
        load_rows(DataConfig(source="local", path=bad, question_field="q", answer_field="a",
                             gold="field"))


def test_csv_values_are_text(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,level\n"What is 1/2 + 1/4?",0.75,3\n'
                    '"Spread\nover lines?",NA,\n')
    rows = load_rows(DataConfig(source="local", path=str(path), gold="field"))
    assert [r["gold"] for r in rows] == ["0.75", "NA"]
    assert rows[1]["question"] == "Spread\nover lines?"
    assert [r["columns"] for r in rows] == [{"level": "3"}, {"level": ""}]


# ---- TRL's conversational format ----------------------------------------------------------------

CHATS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "solution": "5"},
    {"prompt": [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "Four?"},
                {"role": "user", "content": "And 3 + 3?"}], "solution": "6"},
]


def test_conversational_prompts_keep_their_messages(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    rows = load_rows(DataConfig(source="local", path=path, answer_field="solution",
                                gold="field"))
    assert [r["question"] for r in rows] == ["What is 2 + 3?", "And 3 + 3?"]
    assert [r["gold"] for r in rows] == ["5", "6"]
    assert [r["columns"] for r in rows] == [{"solution": "5"}, {"solution": "6"}]
    batch = PromptIterator(rows, tokenizer, batch_size=2, max_prompt_length=256).next_batch()
    by_question = dict(zip(batch.questions, batch.prompts))
    # the system prompt comes first only where the row has none of its own
    assert by_question["What is 2 + 3?"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                             *CHATS[0]["prompt"]]
    assert by_question["And 3 + 3?"] == CHATS[1]["prompt"]
    ids = dict(zip(batch.questions, batch.prompt_ids))["And 3 + 3?"]
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
        "<|im_end|>\n<|im_start|>assistant\nFour?<|im_end|>\n<|im_start|>user\nAnd 3 + 3?"
        "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("prompt, problem", [
    ([{"role": "system", "content": "Be brief."}], "column 'prompt' has no user message "
                                                   "(roles: system)"),
    ([], "column 'prompt' has no user message (roles: none)"),
    ([{"role": "user", "text": "Hi"}], "column 'prompt' message 0 is not {'role': text, "
                                       "'content': text} (dict {'role': 'user', 'text': 'Hi'})"),
])
def test_bad_conversational_prompt(tmp_path, prompt, problem):
    path = _write_jsonl(tmp_path / "chat.jsonl", CHATS + [{"prompt": prompt, "solution": "1"}])
    with pytest.raises(DataError) as err:
        load_rows(DataConfig(source="local", path=path, answer_field="solution", gold="field"))
    assert str(err.value) == f"data.path={path} line 3: {problem}"


def test_extra_columns_reach_the_batch_by_name(tmp_path, tokenizer):
    rows = [dict(r, level=i, source=f"s{i}") for i, r in enumerate(MATH_ROWS)]
    rows[2].pop("source")  # a row without a column gives None for it
    loaded = load_rows(_math(_write_jsonl(tmp_path / "math.jsonl", rows)))
    it = PromptIterator(loaded, tokenizer, batch_size=3, max_prompt_length=256)
    batch = it.next_batch()
    assert set(batch.columns) == {"problem", "solution", "level", "source"}
    for k, question in enumerate(batch.questions):
        i = [r["problem"] for r in MATH_ROWS].index(question)
        assert batch.columns["level"][k] == i
        assert batch.columns["solution"][k] == MATH_ROWS[i]["solution"]
        assert batch.columns["source"][k] == (None if i == 2 else f"s{i}")


def test_repeated_questions_are_counted_in_one_warning(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS + GSM8K_ROWS[:2] + GSM8K_ROWS[:1])
    said: list[str] = []
    rows = load_rows(_local(path), warn=said.append)
    assert len(rows) == 6
    assert said == [f"data.path={path}: 3 of 6 rows repeat an earlier row's question"]
    load_rows(_local(path))
    load_rows(_local(path))  # evaluation loads the same file again: still one line
    assert capsys.readouterr().err == (f"data warning: data.path={path}: 3 of 6 rows repeat an "
                                       "earlier row's question\n")
    said.clear()
    load_rows(_local(_write_jsonl(tmp_path / "once.jsonl", GSM8K_ROWS)), warn=said.append)
    assert said == []


def test_malformed_file_is_one_line_through_the_cli_before_ray_starts(tmp_path, tiny_model_path,
                                                                     capsys, monkeypatch):
    import grpo_ray.cli
    from grpo_ray.cli import main

    def never_connect(*args, **kwargs):
        raise AssertionError("the command joined or started a Ray cluster")

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", never_connect)

    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n" + GOOD[:-3] + "\n")
    code = main(["train", "--config", "configs/tiny-cpu.yaml", "data.source=local",
                 f"data.path={path}", "eval.split=train", f"model.path={tiny_model_path}",
                 f"output.dir={tmp_path / 'out'}"])
    assert code == 2
    assert capsys.readouterr().err == (f"data error: data.path={path} line 2: not valid JSON "
                                       "(Unterminated string starting at column 42)\n")
    assert not (tmp_path / "out").exists()  # bad input writes nothing


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
    assert [r["gold"] for r in load_rows(cfg, "test")] == GOLDS[2:]
    # evaluation finds the test split by itself
    from grpo_ray.driver.data.dataset import load_eval_rows

    held, source = load_eval_rows(cfg)
    assert [r["gold"] for r in held] == GOLDS[2:]
    assert source == f"split 'test' of data.name={tmp_path}"


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


# ---- held-out rows -----------------------------------------------------------------------------

def _numbered(n: int) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + 0?", "answer": f"{i} + 0 = {i}\n#### {i}"}
            for i in range(n)]


def test_eval_fraction_holds_out_seeded_questions_that_training_never_sees(tmp_path):
    from grpo_ray.driver.data.dataset import load_eval_rows

    rows = _numbered(20)
    path = _write_jsonl(tmp_path / "train.jsonl", rows + rows[:3])  # 3 questions twice
    cfg = _local(path).model_copy(update={"eval_fraction": 0.25})
    train, (held, source) = load_rows(cfg, warn=lambda _: None), load_eval_rows(cfg)
    train_q, held_q = [r["question"] for r in train], [r["question"] for r in held]
    assert not set(train_q) & set(held_q)  # no shared row, repeated questions included
    assert len(set(held_q)) == 5 and len(set(train_q)) == 15  # 25% of the 20 questions
    assert len(train) + len(held) == 23
    assert source == f"{len(held)} of 23 rows of data.path={path} held out " \
                     "(data.eval_fraction=0.25, seed 3407)"
    # in file order on both sides
    in_file = [r["question"] for r in rows + rows[:3]]
    assert held_q == [q for q in in_file if q in set(held_q)]
    assert train_q == [q for q in in_file if q not in set(held_q)]
    # seeded: the same seed gives the same split, another seed another one
    assert [r["question"] for r in load_eval_rows(cfg)[0]] == held_q
    other = load_eval_rows(cfg.model_copy(update={"seed": 1}))[0]
    assert {r["question"] for r in other} != set(held_q)
    with pytest.raises(DataError, match="holds out all 2 distinct questions"):
        load_rows(_local(_write_jsonl(tmp_path / "two.jsonl", rows[:2])).model_copy(
            update={"eval_fraction": 0.9}))


def test_eval_path_is_a_second_file_and_shared_questions_are_counted(tmp_path):
    from grpo_ray.driver.data.dataset import load_eval_rows

    rows = _numbered(6)
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:4])
    test = _write_jsonl(tmp_path / "test.jsonl", rows[3:])
    said: list[str] = []
    cfg = _local(train).model_copy(update={"eval_path": test})
    held, source = load_eval_rows(cfg, warn=said.append)
    assert [r["gold"] for r in held] == ["3", "4", "5"] and source == f"data.eval_path={test}"
    assert len(load_rows(cfg)) == 4  # the training file is whole
    assert said == [f"data.eval_path={test}: 1 of 3 rows ask a question of the training rows"]


@pytest.mark.parametrize("files, expected", [
    ({"train.jsonl": slice(0, 4), "test.jsonl": slice(4, 6)}, "test"),
    ({"data/train-00000-of-00001.parquet": slice(0, 4),
      "data/validation-00000-of-00001.parquet": slice(4, 6)}, "validation"),
])
def test_a_directory_of_split_files_evaluates_on_its_test_or_validation_split(tmp_path, files,
                                                                              expected):
    from grpo_ray.driver.data.dataset import load_eval_rows

    rows = _numbered(6)
    for name, part in files.items():
        path = tmp_path / "d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows[part]), path)
        else:
            _write_jsonl(path, rows[part])
    cfg = _local(tmp_path / "d")
    assert [r["gold"] for r in load_rows(cfg)] == ["0", "1", "2", "3"]
    held, source = load_eval_rows(cfg)
    assert [r["gold"] for r in held] == ["4", "5"]
    assert source == f"split {expected!r} of data.path={tmp_path / 'd'}"


def test_a_directory_without_a_test_split_says_what_to_do(tmp_path):
    from grpo_ray.driver.data.dataset import load_eval_rows

    (tmp_path / "d").mkdir()
    _write_jsonl(tmp_path / "d" / "train.jsonl", _numbered(4))
    with pytest.raises(DataError, match=r"has no 'test' or 'validation' split \(splits: train\): "
                                        "name one with data.eval_split"):
        load_eval_rows(_local(tmp_path / "d"))
    # held out of its train split instead
    cfg = _local(tmp_path / "d").model_copy(update={"eval_fraction": 0.5})
    held, _ = load_eval_rows(cfg)
    assert len(held) == 2 and not {r["question"] for r in held} & \
        {r["question"] for r in load_rows(cfg)}


def test_one_file_without_held_out_rows_is_refused(tmp_path):
    from grpo_ray.driver.data.dataset import load_eval_rows

    path = _write_jsonl(tmp_path / "train.jsonl", _numbered(3))
    with pytest.raises(DataError, match="is one split: hold rows out for evaluation with "
                                        "data.eval_fraction or data.eval_path"):
        load_eval_rows(_local(path))
    rows, source = load_eval_rows(_local(path), "train")
    assert len(rows) == 3 and source == "the training rows (eval.split=train)"
