"""Prompts and data: the XML schema, synthetic problems, dataset loading, the prompt iterator.
Nothing heavy is imported here (`datasets`/`transformers` load inside the functions)."""
from grpo_ray.data.dataset import PromptIterator, load_rows, load_tokenizer
from grpo_ray.data.prompts import SYSTEM_PROMPT, chat_messages, extract_xml_answer, gold_answer
from grpo_ray.data.synthetic import make_problem, synthetic_rows

__all__ = ["PromptIterator", "SYSTEM_PROMPT", "chat_messages", "extract_xml_answer",
           "gold_answer", "load_rows", "load_tokenizer", "make_problem", "synthetic_rows"]
