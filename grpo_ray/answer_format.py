"""The reference recipe's XML schema, shared by every process: the system prompt and chat
template the driver builds prompts with (and the sync probe its fixed completions), the gold
answer it reads from a dataset row, and the answer extraction the reward functions judge."""
from __future__ import annotations

import re
from typing import Any

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


def gold_answer(gsm8k_answer: str) -> str:
    """The text after `####` in a GSM8K answer field, stripped."""
    if "####" not in gsm8k_answer:
        raise ValueError(f"answer has no '####' marker: {gsm8k_answer[:60]!r}")
    return gsm8k_answer.split("####")[-1].strip()


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) of `text`, braces balanced
    (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`; escaped `\\{`, `\\}` do not count), stripped;
    None when there is none or the last one is never closed."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character, `\\{` or `\\}` included
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[starts[-1]:i].strip()
        i += 1
    return None


def extract_xml_answer(text: str) -> str:
    """The text between the last `<answer>` and the following `</answer>`, stripped."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the chat template and the generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding (return_dict=True by default); 4.x a list.
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]
