"""Rows of question/answer/gold from the hub, a local file or the generator, and the prompt
iterator that tokenizes them once and yields seeded, resumable batches.

A row, as `load_rows` returns it:

    {"question": "What is 1/2 + 1/4?",   # `data.question_field`, or the last user message
     "answer": "... \\boxed{\\frac{3}{4}}",  # `data.answer_field` as text
     "gold": "\\frac{3}{4}",              # taken out of it as `data.gold` says
     "prompt": None,                      # the row's chat messages (TRL's conversational format)
     "columns": {"level": 2}}             # every other column, for reward functions

Evaluation's rows (`load_eval_rows`) never come from the training rows unless asked: a second file
(`data.eval_path`), a seeded share of the training questions held out of them
(`data.eval_fraction`, `split_off`), or a `test`/`validation` split.

Files and the hub are read by `driver.data.files`, which names every record by its line or row; every
problem here is one `DataError` line naming the source, the line or row and the column.
`transformers` is imported inside functions: importing this module stays light.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Callable

from grpo_ray.answer_format import SYSTEM_PROMPT, chat_ids, chat_messages, gold_answer, last_boxed
from grpo_ray.config import DataConfig
from grpo_ray.contracts import PromptBatch
from grpo_ray.driver.data.files import (
    DataError,
    Record,
    kind,
    read_hub,
    read_local,
    read_split,
    split_names,
)
from grpo_ray.driver.data.synthetic import held_out_rows, synthetic_rows

# The held-out synthetic rows come from another stream than the train rows (and skip every
# train question, see held_out_rows); any offset works, 1 keeps it obvious.
_EVAL_SEED_OFFSET = 1
RESERVED_COLUMNS = ("prompt", "prompts", "completions", "completion_ids", "answer", "question")
"""Names reward functions receive from the pool itself, so no dataset column is passed under
them: `answer` is the gold, `question` the question text."""

def _stderr_warning(message: str, _said: set[str] = set()) -> None:
    if message not in _said:  # the same file loaded for training and evaluation warns once
        _said.add(message)
        print(f"data warning: {message}", file=sys.stderr)


DEFAULT_EVAL_SPLITS = ("test", "validation")
"""Splits evaluation reads when none is named, the first the dataset has."""


def load_rows(cfg: DataConfig, split: str | None = None,
              warn: Callable[[str], None] = _stderr_warning) -> list[dict[str, Any]]:
    """Rows (see the module's docstring) of one split.

    `split` defaults to `cfg.split`, the training rows; with `cfg.eval_fraction` they are what
    is left once the held-out rows are taken out (`split_off`). Synthetic data has two splits:
    `cfg.split` (seed `cfg.seed`) and its held-out rows, `cfg.eval_split` or `test` (another seed,
    distinct questions, none of them in the train split). A local file is a single split: asking
    it for another than `cfg.split` is an error rather than a silent evaluation on the training
    rows; a local directory has the splits its file names say. Rows of a file or hub dataset
    that repeat an earlier row's question are counted and `warn`ed about (printed to stderr by
    default); synthetic rows repeat by design (they are drawn independently).
    """
    split = split or cfg.split
    if cfg.source == "synthetic":
        held_out = cfg.eval_split or DEFAULT_EVAL_SPLITS[0]
        if split not in (cfg.split, held_out):
            raise DataError(f"data.source=synthetic has splits {cfg.split!r} and "
                            f"{held_out!r}, not {split!r}")
        train = synthetic_rows(cfg.num_synthetic, cfg.seed, cfg.synthetic_max_value)
        if split == cfg.split:
            raw = train
        else:
            raw = held_out_rows(cfg.num_synthetic, cfg.seed + _EVAL_SEED_OFFSET,
                                cfg.synthetic_max_value, {r["question"] for r in train})
        return _validated([(f"row {i}", r) for i, r in enumerate(raw)],
                          f"data.source=synthetic split {split!r}", cfg)
    rows = _read(cfg, split, warn)
    if split == cfg.split and cfg.eval_fraction:
        rows, _ = split_off(rows, cfg.eval_fraction, cfg.seed)
    return rows


def load_eval_rows(cfg: DataConfig, split: str | None = None,
                   warn: Callable[[str], None] = _stderr_warning
                   ) -> tuple[list[dict[str, Any]], str]:
    """The rows evaluation reads, in file order, and a few words on where they come from.

    `split` (`Config.eval_split`) equal to `cfg.split` evaluates on the training rows (asked
    for). Otherwise: `cfg.eval_path`'s rows; or the rows `cfg.eval_fraction` holds out of the
    training split; or synthetic data's held-out rows; or the named split of a hub dataset or
    a local directory, by default `test`, else `validation`. A single local file with none of
    these has no held-out rows: a `DataError` says how to get some.
    """
    if split == cfg.split:
        return load_rows(cfg, split, warn), f"the training rows (eval.split={split})"
    if cfg.eval_path is not None:
        source = f"data.eval_path={cfg.eval_path}"
        rows = _validated(read_local(cfg.eval_path, source), source, cfg)
        train = {r["question"] for r in load_rows(cfg, warn=warn)}
        shared = sum(r["question"] in train for r in rows)
        if shared:
            warn(f"{source}: {shared} of {len(rows)} rows ask a question of the training rows")
        return rows, source
    if cfg.eval_fraction:
        rows = _read(cfg, cfg.split, warn)
        _, held = split_off(rows, cfg.eval_fraction, cfg.seed)
        return held, (f"{len(held)} of {len(rows)} rows of {_source(cfg, cfg.split)} held out "
                      f"(data.eval_fraction={cfg.eval_fraction:g}, seed {cfg.seed})")
    if cfg.source == "synthetic":
        name = split or cfg.eval_split or DEFAULT_EVAL_SPLITS[0]
        return load_rows(cfg, name, warn), f"synthetic held-out rows (split {name!r})"
    if cfg.source == "local" and not _is_directory(cfg):
        raise DataError(f"data.path={cfg.path} is one split: hold rows out for evaluation with "
                        "data.eval_fraction or data.eval_path, or evaluate on the training rows "
                        f"with eval.split={cfg.split}")
    name, subset = (cfg.name, cfg.subset) if cfg.source == "hub" else (cfg.path, None)
    where = f"data.name={cfg.name}" if cfg.source == "hub" else f"data.path={cfg.path}"
    if split is None:
        try:
            names = split_names(name, subset, where)
        except DataError:  # no listing (an offline cache, say): loading `test` says what fails
            names = [DEFAULT_EVAL_SPLITS[0]]
        split = next((s for s in DEFAULT_EVAL_SPLITS if s in names), None)
        if split is None:
            raise DataError(f"{where} has no {' or '.join(map(repr, DEFAULT_EVAL_SPLITS))} split "
                            f"(splits: {', '.join(names)}): name one with data.eval_split, or "
                            "hold rows out with data.eval_fraction or data.eval_path")
    return load_rows(cfg, split, warn), f"split {split!r} of {where}"


def split_off(rows: list[dict[str, Any]], fraction: float,
              seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out), each in the rows' order: `fraction` of the distinct questions (at least
    one), chosen by `random.Random(seed)`, go to the held-out rows with every row that asks them,
    so the two parts share no question."""
    questions = list(dict.fromkeys(r["question"] for r in rows))
    count = max(1, round(fraction * len(questions)))
    if count >= len(questions):
        raise DataError(f"data.eval_fraction={fraction:g} holds out all {len(questions)} "
                        "distinct questions: nothing is left to train on")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    held = {questions[i] for i in order[:count]}
    return ([r for r in rows if r["question"] not in held],
            [r for r in rows if r["question"] in held])


def _source(cfg: DataConfig, split: str) -> str:
    if cfg.source == "hub":
        return f"data.name={cfg.name} ({cfg.subset}, {split})"
    if not _is_directory(cfg):
        return f"data.path={cfg.path}"
    return f"data.path={cfg.path} ({split})"


def _is_directory(cfg: DataConfig) -> bool:
    """Local data in a directory of split files (else `data.path` is one file)."""
    return cfg.path is not None and Path(cfg.path).is_dir()


def _read(cfg: DataConfig, split: str, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of one split of hub or local data, checked; repeated questions are `warn`ed about."""
    source = _source(cfg, split)
    if cfg.source == "local":
        if _is_directory(cfg):
            records = read_split(cfg.path, None, split, source)
        elif split != cfg.split:
            raise DataError(f"data.source=local has one split ({cfg.split!r}, the file "
                            f"data.path={cfg.path}), not {split!r}")
        else:
            records = read_local(cfg.path, source)
    elif cfg.source == "hub":
        records = read_hub(cfg, split, source)
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}")
    rows = _validated(records, source, cfg)
    repeats = len(rows) - len({r["question"] for r in rows})
    if repeats:
        warn(f"{source}: {repeats} of {len(rows)} rows repeat an earlier row's question")
    return rows


# ---- checking ----------------------------------------------------------------------------------

def _validated(records: list[Record], source: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """Check every row, take out its question (or chat messages) and gold answer."""
    if not records:
        raise DataError(f"{source}: no rows")
    names = list(dict.fromkeys(k for _, row in records for k in row))
    qcol = cfg.question_field
    if qcol not in names:
        if "prompt" not in names:
            raise DataError(f"{source}: no {qcol!r} column, nor a 'prompt' column of chat "
                            f"messages (columns: {', '.join(names)})")
        qcol = "prompt"
    if cfg.answer_field not in names:
        raise DataError(f"{source}: no {cfg.answer_field!r} column (columns: "
                        f"{', '.join(names)})")
    out = []
    for where, row in records:
        try:
            out.append(_row(row, qcol, cfg))
        except ValueError as e:
            raise DataError(f"{source} {where}: {e}") from None
    return out


def _row(row: dict[str, Any], qcol: str, cfg: DataConfig) -> dict[str, Any]:
    """The row's question, messages, answer text, gold and other columns; ValueError says what
    is wrong with it."""
    value = row.get(qcol)
    messages = None
    if isinstance(value, list):
        messages = _messages(value, qcol)
        question = [m["content"] for m in messages if m["role"] == "user"][-1]
    else:
        question = _text(qcol, value)
    acol = cfg.answer_field
    answer = row.get(acol)
    if cfg.gold == "field" and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text(acol, answer)
    if cfg.gold == "after-hashes":
        if "####" not in answer:
            raise ValueError(f"column {acol!r} has no '####' marker")
        gold = gold_answer(answer)
        if not gold:
            raise ValueError(f"column {acol!r} has nothing after its '####' marker")
    elif cfg.gold == "boxed":
        boxed = last_boxed(answer)
        if boxed is None:
            raise ValueError(f"column {acol!r} has no \\boxed{{...}}"
                             + (" (its last one is never closed)" if "\\boxed" in answer
                                or "\\fbox" in answer else ""))
        if not boxed:
            raise ValueError(f"column {acol!r} has an empty \\boxed{{}}")
        gold = boxed
    else:
        gold = answer.strip()
    return {"question": question, "answer": answer, "gold": gold, "prompt": messages,
            "columns": {k: v for k, v in row.items() if k not in RESERVED_COLUMNS}}


def _text(column: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"column {column!r} is missing")
    if not isinstance(value, str):
        raise ValueError(f"column {column!r} is not text ({kind(value)})")
    if not value.strip():
        raise ValueError(f"column {column!r} is empty")
    return value


def _messages(value: list[Any], column: str) -> list[dict[str, str]]:
    """TRL's conversational prompt: a list of `{"role", "content"}` with a user message."""
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"column {column!r} message {k} is not {{'role': text, "
                             f"'content': text}} ({kind(m)})")
    if not any(m["role"] == "user" for m in value):
        raise ValueError(f"column {column!r} has no user message (roles: "
                         f"{', '.join(m['role'] for m in value) or 'none'})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"model.path={path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PromptIterator:
    """Endless batches of prompts, each row tokenized once with the chat template.

    Epoch `e` visits the rows in the order `random.Random(seed + e).shuffle` gives, `batch_size`
    at a time; the last `len(rows) % batch_size` rows of that order are dropped (as a
    `drop_last` DataLoader does), so a batch never mixes two epochs and every batch is full.
    `state_dict()` / `load_state_dict()` make a restored iterator yield exactly the batches the
    original would have.
    """

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, batch_size: int,
                 max_prompt_length: int, system_prompt: str | None = None,
                 seed: int = 3407) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size})")
        if len(rows) < batch_size:
            raise DataError(f"{len(rows)} rows cannot fill one batch of {batch_size} prompts")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                             "template: prompts need one (use an instruct/chat model)")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        """Epoch of the next batch."""
        self.position = 0
        """Index, in this epoch's shuffled order, of the next batch's first row."""
        system = SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.messages = [prompt_messages(r, system) for r in rows]
        self.column_names = list(dict.fromkeys(k for r in rows for k in r.get("columns", {})))
        """The rows' other columns (a row without one gives None), passed to the rewards."""
        self.prompt_ids = [chat_ids(tokenizer, m) for m in self.messages]
        too_long = [i for i, ids in enumerate(self.prompt_ids) if len(ids) > max_prompt_length]
        if too_long:
            i = too_long[0]
            raise DataError(f"row {i}: prompt is {len(self.prompt_ids[i])} tokens with the chat "
                             f"template, above max_prompt_length={max_prompt_length} "
                             f"({len(too_long)} of {len(rows)} rows are too long)")
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = list(range(len(self.rows)))
            random.Random(self.seed + self.epoch).shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> PromptBatch:
        picked = self._epoch_order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        if self.position + self.batch_size > len(self.rows):
            self.epoch, self.position = self.epoch + 1, 0
        return PromptBatch(prompt_ids=[list(self.prompt_ids[i]) for i in picked],
                           prompts=[[dict(m) for m in self.messages[i]] for i in picked],
                           answers=[self.rows[i]["gold"] for i in picked],
                           questions=[self.rows[i]["question"] for i in picked],
                           columns={name: [self.rows[i].get("columns", {}).get(name)
                                           for i in picked] for name in self.column_names})

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> PromptBatch:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints (JSON-safe) for a checkpoint."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved iterator stopped; its seed wins over this one's, since the
        point is to replay the saved run's order."""
        if state.get("num_rows", len(self.rows)) != len(self.rows):
            raise DataError(f"iterator state was saved with {state['num_rows']} rows, this "
                             f"iterator has {len(self.rows)}: the data changed since the "
                             "checkpoint")
        if not 0 <= state["position"] <= len(self.rows) - self.batch_size:
            raise DataError(f"iterator state position={state['position']} does not fit "
                             f"{len(self.rows)} rows in batches of {self.batch_size}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order_epoch = -1


def prompt_messages(row: dict[str, Any], system_prompt: str) -> list[dict[str, str]]:
    """The chat of a row: its own messages (TRL's conversational `prompt`) with the system prompt
    put first only when they hold no system message, else system prompt + the question."""
    messages = row.get("prompt")
    if messages is None:
        return chat_messages(row["question"], system_prompt)
    if any(m["role"] == "system" for m in messages):
        return [dict(m) for m in messages]
    return [{"role": "system", "content": system_prompt}, *(dict(m) for m in messages)]
