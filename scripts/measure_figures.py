#!/usr/bin/env python3
"""Measure the figures the README quotes for a new user's machine, instead of remembering them.

    git clone <this repository> /tmp/fresh && cd /tmp/fresh
    python3 scripts/measure_figures.py [--skip setup,demo,test] [--keep-cache] [--write]

Runs what the README tells a new user to run, each on an 80-column pseudo-terminal as from a
shell, with the time of every piece of output: `make setup` (a fresh `.venv`), `make demo` (with
an empty model cache, so the warm-up of `builtin:tiny-warm` is measured; `--keep-cache` keeps the
usual one) and `make test`. From their output and the demo's `outputs/demo/` it takes the set-up
time, the demo's warm-up, start-up, training and evaluation times, held-out accuracy before and
after, the suite's time and summary line, and the longest quiet stretch of each command (with
the last line printed before it). Prints them, and with `--write` stores them in
`docs/figures.json` and rewrites the README's block between the `figures` markers from that file
(tests/test_readme.py checks that the block is what the file renders).

Only the standard library: it runs before `.venv` exists. Start it from the repository's root.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
README = ROOT / "README.md"
BEGIN = "<!-- figures: written by scripts/measure_figures.py --write from docs/figures.json -->"
END = "<!-- /figures -->"


def run_timed(cmd: list[str], env: dict[str, str], columns: int = 80) -> dict:
    """Run `cmd` on a pseudo-terminal of `columns` columns; its exit code, wall time, output,
    and the longest stretch without output with the last line shown before it."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    events: list[tuple[float, str]] = []  # (seconds since the start, output at that time)
    last, longest, before = start, 0.0, ""
    while True:
        ready = select.select([master], [], [], 1.0)[0]
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: nothing holds the terminal any more
            break
        if not data:
            break
        now = time.monotonic()
        if now - last > longest:
            longest, before = now - last, last_line(b"".join(chunks))
        last = now
        chunks.append(data)
        events.append((now - start, data.decode(errors="replace")))
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    os.close(master)
    code = proc.wait()
    return {"code": code, "wall_s": round(time.monotonic() - start, 1),
            "output": b"".join(chunks).decode(errors="replace"), "events": events,
            "quiet_s": round(longest, 1), "quiet_after": before}


def pytest_summary(output: str) -> str:
    """pytest's last line (`514 passed, 24 deselected, ... in 908.26s (0:15:08)`), uncoloured."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    summary = re.findall(r"=+ (.*(?:passed|failed).*?) =+", plain)
    return summary[-1] if summary else "no summary"


def seconds_between(events: list[tuple[float, str]], first: str, then: str) -> float | None:
    """Seconds from the output holding `first` to the next output holding `then`."""
    start = next((t for t, text in events if first in text), None)
    if start is None:
        return None
    end = next((t for t, text in events if t >= start and then in text), None)
    return None if end is None else round(end - start, 1)


def last_line(output: bytes) -> str:
    """The last non-empty line a terminal shows of `output` (after its last carriage return)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.replace("\r\n", "\n").split("\n")]
    return next((line for line in reversed(lines) if line), "")[:100]


def demo_figures(output: str, out_dir: Path) -> dict:
    """What `make demo` printed and wrote to `out_dir`: warm-up, start-up, training and
    evaluation seconds, held-out accuracy before and after."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["tag"]: r for r in map(json.loads, (out_dir / "eval.jsonl").read_text()
                                      .splitlines())}
    up = re.search(r"placed: .*?; up in (\d+) s", output)
    return {"steps": len(rows),
            "train_s": round(sum(r["time/step_s"] for r in rows), 1),
            "step_s": round(sum(r["time/step_s"] for r in rows) / len(rows), 2),
            "startup_s": int(up.group(1)) if up else None,
            "eval_s": [round(evals[t]["metrics"]["time_s"], 1) for t in ("before", "after")],
            "heldout_before": round(evals["before"]["metrics"]["accuracy"], 3),
            "heldout_after": round(evals["after"]["metrics"]["accuracy"], 3)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU") if Path("/proc/cpuinfo").exists() else ""
    memory = next((int(line.split()[1]) / 2**20 for line in
                   Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0.0) if Path("/proc/meminfo").exists() else 0
    python = subprocess.run(["python3", "--version"], capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT)
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "memory_gib": round(memory),
            "python": python.stdout.strip() or python.stderr.strip(),
            "commit": commit.stdout.strip()}


def quiet(figures: dict) -> str:
    after = figures["quiet_after"].replace("|", "\\|")
    seconds = f"{figures['quiet_s']:.0f} s"
    return f"{seconds}, after `{after}`" if after else seconds


def render(figures: dict) -> str:
    """The README's block of figures, from `docs/figures.json`'s content."""
    import textwrap

    m = figures["machine"]
    where = " in a fresh clone" if "setup" in figures else ""
    lines = textwrap.wrap(
        f"Measured on {figures['date']} by `scripts/measure_figures.py`{where} (commit "
        f"{m['commit']}), on {m['cores']} CPU cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"{m['python']}:", 100) + [""]
    lines.append("| command | time | longest quiet stretch, after the line |")
    lines.append("|---|---|---|")
    if "setup" in figures:
        s = figures["setup"]
        lines.append(f"| `make setup` (a fresh `.venv`) | {s['wall_s']:.0f} s | {quiet(s)} |")
    if "demo" in figures:
        d = figures["demo"]
        warm = (f"warm-up of the tiny model {d['warmup_s']:.0f} s (once, then cached), "
                if d.get("warmup_s") else "")
        lines.append(
            f"| `make demo` | {d['wall_s']:.0f} s: {warm}start-up {d['startup_s']} s, "
            f"{d['steps']} GRPO steps {d['train_s']:.0f} s ({d['step_s']:.2f} s a step), "
            f"evaluations {d['eval_s'][0]:.0f} s + {d['eval_s'][1]:.0f} s; held-out accuracy "
            f"{d['heldout_before']:.3f} -> {d['heldout_after']:.3f} | {quiet(d)} |")
    if "test" in figures:
        t = figures["test"]
        lines.append(f"| `make test` | {t['wall_s'] / 60:.0f} min ({t['summary']}) | {quiet(t)} |")
    return "\n".join(lines)


def write_readme(figures: dict) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + render(figures) + "\n" + text[end:])


def measure(command: str, env: dict[str, str], keep_cache: bool) -> tuple[int, dict]:
    """Run `make <command>` as a user would; its exit code and figures."""
    if command != "demo":
        r = run_timed(["make", command], env)
        figures = {k: r[k] for k in ("wall_s", "quiet_s", "quiet_after")}
        if command == "test":
            figures["summary"] = pytest_summary(r["output"])
        return r["code"], figures
    with tempfile.TemporaryDirectory(prefix="grpo-ray-cache-") as cache:
        r = run_timed(["make", "demo"], env if keep_cache else {**env, "GRPO_RAY_CACHE": cache})
    if r["code"] != 0:
        return r["code"], {}
    return 0, {"wall_s": r["wall_s"], "quiet_s": r["quiet_s"], "quiet_after": r["quiet_after"],
               # from the line that announces the warm-up to the next step's line
               "warmup_s": seconds_between(r["events"], "builtin:tiny-warm: building it once",
                                           "starting a local Ray"),
               **demo_figures(r["output"], ROOT / "outputs" / "demo")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", default="", help="comma-separated: setup, demo, test")
    p.add_argument("--keep-cache", action="store_true",
                   help="use the usual model cache (the demo's warm-up may be cached already)")
    p.add_argument("--write", action="store_true",
                   help="store docs/figures.json and rewrite the README's block from it, after "
                   "each command (so that `make test` checks the figures measured before it)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    env = {**os.environ, "COLUMNS": "80", "RAY_ADDRESS": ""}
    figures = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    if "setup" not in skip and (ROOT / ".venv" / ".installed").exists():
        print("make setup has nothing to do here (.venv is set up): measure in a fresh clone, "
              "or pass --skip setup", file=sys.stderr)
        return 2
    for command in ("setup", "demo", "test"):
        if command in skip:
            continue
        code, figures[command] = measure(command, env, args.keep_cache)
        print(json.dumps({command: figures[command]}, indent=2))
        if code != 0:
            print(f"make {command} failed (exit code {code}); not written", file=sys.stderr)
            return 1
        if args.write:
            FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
            write_readme(figures)
            print(f"wrote {FIGURES} and the README's block")
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
