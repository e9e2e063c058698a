"""Which completions take part in the loss (pure; no torch needed)."""
from __future__ import annotations


def loss_mask(totals: list[float | None], finish_reasons: list[str],
              mask_truncated_completions: bool) -> list[bool]:
    """One flag per completion, prompt-major: False for a completion no reward function could
    score (total None) and, with `mask_truncated_completions` (TRL's option, from DAPO), for one
    cut at the length limit (finish reason `length`), whose text ends before its answer.

    totals = [1.0, None, 0.5], finish_reasons = ["stop", "stop", "length"]
    -> [True, False, True], or [True, False, False] when masking truncated completions."""
    if len(totals) != len(finish_reasons):
        raise ValueError(f"loss_mask: {len(totals)} totals but {len(finish_reasons)} finish "
                         "reasons")
    return [total is not None and not (mask_truncated_completions and reason == "length")
            for total, reason in zip(totals, finish_reasons)]
