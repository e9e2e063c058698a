"""The prompt iterator: the rows of `driver.data.dataset` tokenized once with the model's chat
template, in seeded, resumable batches (what a checkpoint records is its position).
`transformers` is imported inside functions: importing this module stays light."""
from __future__ import annotations

import random
from typing import Any

from grpo_ray.answer_format import SYSTEM_PROMPT, chat_ids, chat_messages
from grpo_ray.contracts import PromptBatch
from grpo_ray.driver.data.files import DataError


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
