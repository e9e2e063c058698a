"""Where per-step metrics go: a compact console table, `metrics.jsonl`, TensorBoard, and Weights &
Biases when configured. The loop calls one `Tracker`; a sink that is off is simply absent. Every
row of a JSON-lines file starts with its `time`."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Protocol, TextIO

from grpo_ray.config import LoggingConfig

# The columns of the console table: (metric key, header, format, what the header means). The
# widths keep a row within 80 columns.
TABLE = [
    ("step", "step", "{:>4.0f}", None),
    ("reward/mean", "reward", "{:>6.3f}", "mean total reward"),
    ("reward/std", "r_std", "{:>5.3f}", "its std"),
    ("accuracy", "acc", "{:>5.2f}", "share judged right"),
    ("format_rate", "fmt", "{:>5.2f}", "share in the strict format"),
    ("completion_length", "len", "{:>5.1f}", "completion tokens"),
    ("learner/kl", "kl", "{:>7.5f}", "KL to the reference"),
    ("learner/clip_fraction", "clip", "{:>5.3f}", "share of clipped ratios"),
    ("learner/loss", "loss", "{:>7.4f}", None),
    ("learner/grad_norm", "gnorm", "{:>6.3f}", "gradient norm"),
    ("learner/learning_rate", "lr", "{:>7.1e}", "learning rate"),
    ("time/step_s", "step_s", "{:>6.2f}", "seconds a step"),
]


def table_legend(width: int = 80) -> list[str]:
    """What the table's abbreviated headers mean, in lines of at most `width` characters."""
    import textwrap

    words = "; ".join(f"{h} = {meaning}" for _, h, _, meaning in TABLE if meaning)
    return textwrap.wrap(f"columns: {words} (every figure of a step: metrics.jsonl)", width)


def timestamp() -> str:
    """Now, as the `time` of a row: ISO 8601, UTC, to the second."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` to a JSON-lines file, its `time` first."""
    with open(path, "a") as f:
        f.write(json.dumps({"time": timestamp(), **row}) + "\n")


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class ConsoleTable:
    """One aligned row per step; the header again every 20 rows, the first time under a legend
    of its abbreviations."""

    def __init__(self, print_fn=print, every: int = 20):
        self.print, self.every, self.rows = print_fn, every, 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rows == 0:
            for line in table_legend():
                self.print(line)
        if self.rows % self.every == 0:
            self.print(" ".join(f"{h:>{len(f.format(0.0))}}" for _, h, f, _ in TABLE))
        values = {**metrics, "step": step}
        self.print(" ".join(f.format(values[k]) if k in values else " " * len(f.format(0.0))
                            for k, _, f, _ in TABLE))
        self.rows += 1

    def close(self) -> None:
        pass


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"time": timestamp(), "step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, config: dict[str, Any], out_dir: Path):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb is true but wandb is not installed "
                               "(pip install 'grpo-ray[wandb]')") from None
        self.run = wandb.init(project=project, config=config, dir=str(out_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def on_terminal() -> bool:
    """Nothing redirected: a bar in a file or a pipe is noise (carriage returns, one copy per
    refresh)."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def bar_size(stream: TextIO) -> dict[str, Any]:
    """tqdm's size arguments for a bar on `stream`: it follows the window where the terminal
    reports a size; one that reports none (a pty without a window size, as `script` gives)
    would get a bar of 0 columns, i.e. none, so it gets shutil's fallback size (COLUMNS, else
    80 columns)."""
    if _width(stream) > 0:
        return {"dynamic_ncols": True}
    size = shutil.get_terminal_size()
    return {"ncols": size.columns, "nrows": size.lines}


BAR_FORMAT = "step {n_fmt}/{total_fmt} {desc} |{bar}| {elapsed}<{remaining}, {rate_fmt}"
"""The headline figures first, so that a narrow terminal cuts the bar, not them: at 80 columns
`step 12/60 reward 1.234 acc 0.42 |████      | 00:36<02:24,  3.00s/step`."""


class ProgressBar:
    """A bar over the run's steps with the headline figures, at the bottom of the terminal.

    It appears with the first step logged: its clock starts there, less that step's
    `time/step_s`, so its rate and ETA count training steps, not placement and the first
    evaluation (which print lines of their own). While it is up, whatever the process prints to
    stdout or stderr (the table, evaluation lines, `--verbose` worker logs) goes above it: each
    complete line is written with the bar cleared, then the bar is drawn again (tqdm's
    `external_write_mode`, for any print to either stream). It closes after the last step (or
    when the run stops), ending its line, so its final state stays under the table and the
    next line starts on a line of its own."""

    def __init__(self, total_steps: int):
        self.total, self.bar = total_steps, None

    def log(self, metrics: dict[str, float], step: int) -> None:
        figures = (f"reward {metrics.get('reward/mean', float('nan')):.3f} "
                   f"acc {metrics.get('accuracy', float('nan')):.2f}")
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step - 1, desc=figures, unit="step",
                            bar_format=BAR_FORMAT, file=sys.stderr, **bar_size(sys.stderr))
            # tqdm's clock began now; the step it shows began `time/step_s` ago
            self.bar.start_t -= metrics.get("time/step_s", 0.0)
            self.streams = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = (_AboveBar(s, self.bar) for s in self.streams)
        if self.bar.disable:  # closed after the last step
            return
        self.bar.n = step
        self.bar.set_description_str(figures)
        if step >= self.bar.total:
            self.close()

    def close(self) -> None:
        if self.bar is None or self.bar.disable:
            return
        for wrapper in (sys.stdout, sys.stderr):
            if isinstance(wrapper, _AboveBar):
                wrapper.finish()
        if isinstance(sys.stdout, _AboveBar):  # unless someone replaced them since
            sys.stdout = self.streams[0]
        if isinstance(sys.stderr, _AboveBar):
            sys.stderr = self.streams[1]
        self.bar.close()  # draws the final state and ends the line


class _AboveBar:
    """A console stream whose complete lines print above `bar`. Each thread keeps its own
    unfinished line: Ray prints forwarded worker logs from a thread of its own."""

    def __init__(self, stream: TextIO, bar: Any):
        self.stream, self.bar, self.pending = stream, bar, threading.local()

    def write(self, text: str) -> int:
        lines, newline, rest = (getattr(self.pending, "text", "") + text).rpartition("\n")
        self.pending.text = rest
        if newline:  # tqdm clears the bars on its file, and draws them again after
            with self.bar.external_write_mode(file=self.bar.fp):
                self.stream.write(lines + "\n")
                self.stream.flush()
        return len(text)

    def finish(self) -> None:
        """Print this thread's unfinished line, if any."""
        if getattr(self.pending, "text", ""):
            self.write("\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


class Tracker:
    """Fans metrics out to the configured sinks, writes completion samples to JSONL and, at
    the end, a plot of reward and accuracy against steps (`curves.png`)."""

    def __init__(self, cfg: LoggingConfig, out_dir: str | Path, config: dict[str, Any],
                 print_fn=print, total_steps: int | None = None):
        self.out = out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.sinks: list[Sink] = [ConsoleTable(print_fn), JsonlSink(out / "metrics.jsonl")]
        if cfg.progress_bar and total_steps and on_terminal():
            self.sinks.append(ProgressBar(total_steps))
        if cfg.tensorboard:
            self.sinks.append(TensorBoardSink(out / "tensorboard"))
        if cfg.wandb:
            self.sinks.append(WandbSink(cfg.wandb_project, config, out))
        self.samples = open(out / "completions.jsonl", "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation (`evaluation.eval_record`: its step, tag, metrics, sanity answer and
        completions): a line of `eval.jsonl`, and its metrics as `eval/...` in TensorBoard and
        W&B; not the console table or `metrics.jsonl`, whose rows are training steps."""
        append_jsonl(self.out / "eval.jsonl", record)
        for sink in self.sinks:
            if isinstance(sink, (TensorBoardSink, WandbSink)):
                sink.log({f"eval/{k}": v for k, v in record["metrics"].items()}, record["step"])

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self.samples.write(json.dumps({"time": timestamp(), "step": step, **row}) + "\n")
        self.samples.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.samples.close()
        if (self.out / "metrics.jsonl").stat().st_size:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


def plot_curves(metrics_path: Path, png_path: Path,
                keys: tuple[str, ...] = ("reward/mean", "accuracy", "format_rate")) -> Path:
    """Plot the given per-step metrics of a `metrics.jsonl` against steps (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
