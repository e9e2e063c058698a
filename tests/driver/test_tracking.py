"""What a user sees: the console table, metrics.jsonl, TensorBoard events and the curves plot."""
import json
import re

import pytest

from grpo_ray.config import LoggingConfig
from grpo_ray.driver.tracking import TABLE, ConsoleTable, Tracker, table_legend


def test_console_table_aligns_rows_under_the_header():
    lines: list[str] = []
    table = ConsoleTable(lines.append, every=2)
    for step in (1, 2, 3):
        table.log({"reward/mean": 0.5 * step, "accuracy": 0.25, "time/step_s": 1.5}, step)
    legend = table_legend()
    assert lines[:len(legend)] == legend and len(lines) == len(legend) + 5  # header, 2 rows,
    lines = lines[len(legend):]                                           # header, row
    header, row = lines[0].split(), lines[1].split()
    assert header[:4] == ["step", "reward", "r_std", "acc"]
    assert row[:2] == ["1", "0.500"] and "0.25" in row
    assert len(lines[0]) == len(lines[1]) <= 80


def test_the_legend_explains_every_abbreviated_header():
    legend = " ".join(table_legend())
    for _, header, _, meaning in TABLE:
        if header not in ("step", "loss"):  # words, not abbreviations
            assert f"{header} = {meaning}" in legend
    assert all(len(line) <= 80 for line in table_legend())


def test_tracker_writes_jsonl_tensorboard_samples_and_plot(tmp_path):
    lines: list[str] = []
    tracker = Tracker(LoggingConfig(), tmp_path, {"x": 1}, print_fn=lines.append, total_steps=3)
    for step in (1, 2, 3):
        tracker.log({"reward/mean": step / 3, "accuracy": step / 10, "format_rate": 1.0}, step)
        tracker.log_samples([{"completion": f"c{step}"}], step)
    tracker.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["accuracy"] == 0.3
    samples = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert samples[1] == {"time": samples[1]["time"], "step": 2, "completion": "c2"}
    # a timestamp first in every row (ISO 8601, UTC), so a run's folder says when each step ran
    for row in rows + samples:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["time"])
        assert list(row)[0] == "time"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len(lines) == len(table_legend()) + 4  # header + 3 rows; no bar: not a terminal


@pytest.mark.parametrize("total", [3, 5], ids=["finished", "stopped at step 3"])
@pytest.mark.parametrize("columns", [80, 0], ids=["80 columns", "no window size"])
def test_bar_on_a_terminal_with_lines_printed_above_and_after_it(tmp_path, columns, total):
    """Under a pseudo-terminal (as from a shell; `script` gives one that reports no size, and
    gets 80 columns): the bar shows step, reward and accuracy within 80 columns; the table and
    anything else printed meanwhile reads as whole lines above it; and what is printed after it
    (the final evaluation, the resume command after a stop) starts at column 0 of a line of its
    own, the bar's last state left above it."""
    import re
    import sys

    from helpers import run_in_terminal, terminal_screen

    steps = [{"reward/mean": s / 4, "accuracy": 0.5, "time/step_s": 0.25} for s in (1, 2, 3)]
    code = (
        "import sys, time\n"
        "from grpo_ray.config import LoggingConfig\nfrom grpo_ray.driver.tracking import Tracker\n"
        f"t = Tracker(LoggingConfig(tensorboard=False), {str(tmp_path)!r}, {{}}, "
        f"total_steps={total})\n"
        "print('placed: the actors')\n"
        "time.sleep(1.5)  # placement and the first evaluation, before the bar's clock\n"
        f"for step, m in enumerate({steps!r}, 1):\n"
        "    t.log(m, step)\n"
        "    print(f'eval line {step}', file=sys.stderr)\n"
        "t.close()\n"
        "print('interrupted at step 3: resume with: grpo-ray train --resume', file=sys.stderr)\n"
        "print('after the bar')\n")
    code_rc, out = run_in_terminal([sys.executable, "-c", code], timeout=120, columns=columns)
    assert code_rc == 0, out
    table: list[str] = []  # what the same rows print without a terminal
    console = ConsoleTable(table.append)
    for step, m in enumerate(steps, 1):
        console.log(m, step)

    # drawn with the first step (from where it began), then redrawn over itself (carriage
    # returns) at every step
    drawn = re.findall(rf"\rstep (\d)/{total} reward", out)
    assert set(drawn) == {"0", "1", "2", "3"}, out
    shown = [line for line in terminal_screen(out, columns or 80) if line]
    expected = ["placed: the actors", *table[:-3], table[-3], "eval line 1", table[-2],
                "eval line 2", table[-1], "eval line 3",
                "interrupted at step 3: resume with: grpo-ray train --resume", "after the bar"]
    # the bar's last state: under the last step's row where that step ends the run, else where
    # the bar was when it closed (the run stopped after "eval line 3")
    at = expected.index("eval line 3") + (total != len(steps))
    bar = shown.pop(at)
    assert shown == expected, shown
    # at 80 columns (or what a terminal without a size gets): the figures whole, a bar beside
    assert re.match(rf"step 3/{total} reward 0.750 acc 0.50 \|█+[▏▎▍▌▋▊▉]? *\| 00:0\d<", bar), bar
    assert len(bar) <= 80 and bar.count("█") + bar.count(" ") > 10, bar


def test_eval_metrics_go_to_eval_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(LoggingConfig(), tmp_path, {}, print_fn=lambda _: None)
    metrics = {"accuracy": 0.25, "mean@k": 0.25, "pass@k": 0.5, "maj@k": 0.25}
    tracker.log_eval({"step": 0, "tag": "before", "judge": "math-verify (reward 'math')",
                      "metrics": metrics})
    tracker.close()
    (row,) = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row.pop("time"))
    assert row == {"step": 0, "tag": "before", "judge": "math-verify (reward 'math')",
                   "metrics": metrics}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"eval/{k}" for k in metrics}
    assert events.Scalars("eval/pass@k")[0].value == 0.5
    assert not (tmp_path / "metrics.jsonl").read_text()  # training steps only


def test_bar_eta_counts_training_steps_only():
    """Placement and the first evaluation (here 1 s before step 1) are not in the rate: at step 1
    of 30, a step of 0.5 s leaves 29 x 0.5 = 14.5 s, not 29 x 1.5 s."""
    import time

    from grpo_ray.driver.tracking import ProgressBar

    bar = ProgressBar(total_steps=30)
    try:
        time.sleep(1.0)  # placement and the first evaluation
        bar.log({"reward/mean": 0.1, "time/step_s": 0.5}, 1)
        shown = bar.bar.format_meter(**bar.bar.format_dict)
    finally:
        bar.close()
    assert "1/30" in shown and "<00:14" in shown, shown
