"""Rows of question/answer/gold from the hub, a local file or the generator, and the prompt
iterator that tokenizes them once and yields seeded, resumable batches.

`datasets` and `transformers` are imported inside functions: importing this module stays light.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from grpo_ray.config import DataConfig, UserError
from grpo_ray.contracts import PromptBatch
from grpo_ray.data.prompts import SYSTEM_PROMPT, chat_messages, gold_answer
from grpo_ray.data.synthetic import held_out_rows, synthetic_rows

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The held-out synthetic rows come from another stream than the train rows (and skip every
# train question, see held_out_rows); any offset works, 1 keeps it obvious.
_EVAL_SEED_OFFSET = 1



class DataError(UserError, ValueError):
    """Data that cannot be trained on (a bad row, a missing file); the message names it."""

    kind = "data error"


def load_rows(cfg: DataConfig, split: str | None = None) -> list[dict[str, str]]:
    """Rows `{"question", "answer" (full text), "gold" (after '####')}` of one split.

    `split` defaults to `cfg.split`. Synthetic data has two splits: `cfg.split` (seed `cfg.seed`)
    and `cfg.eval_split` (another seed, distinct questions, none of them in the train split).
    A local file is a single split: asking it for another than `cfg.split` is an error rather
    than a silent evaluation on the training rows. A bad row raises ValueError naming the source
    and the row (0-based, as `dataset[i]` counts).
    """
    split = split or cfg.split
    if cfg.source == "synthetic":
        if split not in (cfg.split, cfg.eval_split):
            raise DataError(f"data.source=synthetic has splits {cfg.split!r} and "
                             f"{cfg.eval_split!r}, not {split!r}")
        train = synthetic_rows(cfg.num_synthetic, cfg.seed, cfg.synthetic_max_value)
        if split == cfg.split:
            raw = train
        else:
            raw = held_out_rows(cfg.num_synthetic, cfg.seed + _EVAL_SEED_OFFSET,
                                cfg.synthetic_max_value, {r["question"] for r in train})
        return _validated(raw, f"data.source=synthetic split {split!r}")
    if cfg.source == "local":
        if split != cfg.split:
            raise DataError(f"data.source=local has one split ({cfg.split!r}, the file "
                             f"data.path={cfg.path}), not {split!r}")
        return _validated(_load_local(cfg.path), f"data.path={cfg.path}")
    if cfg.source == "hub":
        import datasets

        ds = datasets.load_dataset(cfg.name, cfg.subset, split=split)
        return _validated(ds, f"data.name={cfg.name} ({cfg.subset}, {split})")
    raise DataError(f"data.source: unknown source {cfg.source!r}")


def _load_local(path: str | None) -> Any:
    if path is None:
        raise DataError("data.path: is required with data.source=local")
    fmt = _LOCAL_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"data.path={path}: unknown file type (expected one of "
                         f"{', '.join(_LOCAL_FORMATS)})")
    if not Path(path).is_file():
        raise DataError(f"data.path={path}: file not found")
    import datasets

    # A single local file always loads as the "train" split of `datasets`.
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _validated(rows: Any, source: str) -> list[dict[str, str]]:
    """Check every row and add its gold; `rows` is a list of dicts or a `datasets.Dataset`."""
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for col in ("question", "answer"):
            if col not in columns:
                raise DataError(f"{source}: no {col!r} column (columns: {', '.join(columns)})")
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    if columns is not None:
        rows = rows.to_list()  # one conversion instead of a per-row Arrow lookup
    out = []
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise DataError(f"{source} row {i}: {problem}")
        gold = gold_answer(row["answer"])
        out.append({"question": row["question"], "answer": row["answer"], "gold": gold})
    return out


def _row_problem(row: dict[str, Any]) -> str | None:
    problem = _text_problem("question", row.get("question"))
    problem = problem or _text_problem("answer", row.get("answer"))
    if problem is None and "####" not in row["answer"]:
        problem = "answer has no '####' marker"
    if problem is None and not gold_answer(row["answer"]):
        problem = "answer has nothing after its '####' marker"
    return problem


def _text_problem(column: str, value: Any) -> str | None:
    if value is None:
        return f"{column!r} is missing"
    if not isinstance(value, str):
        return f"{column!r} is not text ({type(value).__name__} {value!r:.40})"
    if not value.strip():
        return f"{column!r} is empty"
    return None


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

    def __init__(self, rows: list[dict[str, str]], tokenizer: Any, batch_size: int,
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
        self.messages = [chat_messages(r["question"], system) for r in rows]
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
                           questions=[self.rows[i]["question"] for i in picked])

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


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the chat template and the generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding (return_dict=True by default); 4.x a list.
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]
