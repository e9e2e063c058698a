"""The reference recipe's XML schema: system prompt, gold-answer and answer extraction."""
from __future__ import annotations

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


def extract_xml_answer(text: str) -> str:
    """The text between the last `<answer>` and the following `</answer>`, stripped."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
