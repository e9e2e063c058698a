"""What a user sees: the console table, metrics.jsonl, TensorBoard events and the curves plot."""
import json

import pytest

from grpo_ray.config import LoggingConfig
from grpo_ray.driver.tracking import ConsoleTable, Tracker


def test_console_table_aligns_rows_under_the_header():
    lines: list[str] = []
    table = ConsoleTable(lines.append, every=2)
    for step in (1, 2, 3):
        table.log({"reward/mean": 0.5 * step, "accuracy": 0.25, "time/step_s": 1.5}, step)
    assert len(lines) == 5  # header, 2 rows, header again, row
    header, row = lines[0].split(), lines[1].split()
    assert header[:4] == ["step", "reward", "r_std", "acc"]
    assert row[:2] == ["1", "0.500"] and "0.25" in row
    assert len(lines[0]) == len(lines[1])


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
    assert samples[1] == {"step": 2, "completion": "c2"}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len(lines) == 4  # header + 3 rows; no bar: the output is not a terminal


@pytest.mark.parametrize("columns", [150, 0], ids=["sized", "no window size"])
def test_bar_on_a_terminal_with_lines_printed_above_it(tmp_path, columns):
    """Under a pseudo-terminal (as from a shell; `script` gives one that reports no size): the
    bar is drawn and redrawn, and the table, and anything else printed meanwhile, reads as whole
    lines above it."""
    import re
    import sys

    from helpers import run_in_terminal, screen_lines

    steps = [{"reward/mean": s / 4, "accuracy": 0.5, "time/step_s": 0.25} for s in (1, 2, 3)]
    code = (
        "import sys\n"
        "from grpo_ray.config import LoggingConfig\nfrom grpo_ray.driver.tracking import Tracker\n"
        f"t = Tracker(LoggingConfig(tensorboard=False), {str(tmp_path)!r}, {{}}, total_steps=3)\n"
        f"for step, m in enumerate({steps!r}, 1):\n"
        "    t.log(m, step)\n"
        "    print(f'eval line {step}', file=sys.stderr)\n"
        "t.close()\nprint('after the bar')\n")
    code_rc, out = run_in_terminal([sys.executable, "-c", code], timeout=120, columns=columns)
    assert code_rc == 0, out
    table: list[str] = []  # what the same rows print without a terminal
    console = ConsoleTable(table.append)
    for step, m in enumerate(steps, 1):
        console.log(m, step)
    header, expected = table[0], table[1:]

    # drawn, then redrawn over itself (carriage returns) at every step
    drawn = re.findall(r"\rgrpo:\s+\d+%\|[^|]*\| (\d)/3 \[[^\]\r]*(?:step/s|s/step)", out)
    assert set(drawn) == {"0", "1", "2", "3"}, out
    shown = [line for line in screen_lines(out) if line.strip()]
    # the bar's last state stays under the last row; later lines print below it
    assert re.match(r"grpo: 100%\|.*\| 3/3 \[.*reward=0.750", shown[6]), shown
    assert shown[:6] + shown[7:] == [header, expected[0], "eval line 1", expected[1],
                                     "eval line 2", expected[2], "eval line 3", "after the bar"]


def test_eval_metrics_go_to_eval_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(LoggingConfig(), tmp_path, {}, print_fn=lambda _: None)
    metrics = {"accuracy": 0.25, "mean@k": 0.25, "pass@k": 0.5, "maj@k": 0.25}
    tracker.log_eval(metrics, 0, "before", {"judge": "math-verify (reward 'math')"})
    tracker.close()
    (row,) = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert row == {"step": 0, "tag": "before", "judge": "math-verify (reward 'math')", **metrics}
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
        time.sleep(1.0)
        bar.log({"reward/mean": 0.1, "time/step_s": 0.5}, 1)
        shown = bar.bar.format_meter(**bar.bar.format_dict)
    finally:
        bar.close()
    assert "1/30" in shown and "<00:14" in shown, shown
