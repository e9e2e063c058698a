"""What a user sees: the console table, metrics.jsonl, TensorBoard events and the curves plot."""
import json

from grpo_ray.config import LoggingConfig
from grpo_ray.tracking import ConsoleTable, Tracker


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
    assert len(lines) == 4  # header + 3 rows: the bar is only for a terminal's print
