"""What a new user runs first, as the README and the Makefile write it: examples that run in
order without colliding, set-up steps that say what they do, figures that come from a script."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from grpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """The `grpo-ray` commands of the README's bash blocks, in order, as argument lists."""
    commands, pending = [], ""
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            try:  # a quoted argument may go on over the next lines
                words = shlex.split(pending + line, comments=True)
            except ValueError:
                pending += line + "\n"
                continue
            pending = ""
            if "grpo-ray" in words:
                commands.append(words[words.index("grpo-ray"):])
    return commands


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_readme_examples_run_in_order_each_in_its_own_output_dir():
    """The two tiny-cpu.yaml examples shared outputs/tiny-cpu: the second was refused there.
    Every CPU training example of the README writes to a directory of its own (a `--resume`
    continues the run of its directory), and every adapter an example evaluates or exports is
    one an earlier example (or `make demo`) trained."""
    trained = {"outputs/demo"}  # make demo's run
    cpu = [c for c in readme_commands() if (option(c, "--config") or "").endswith("-cpu.yaml")]
    assert len(cpu) >= 8, cpu
    for words in cpu:
        overrides = [w for w in words[2:] if "=" in w and not w.startswith("-")]
        if words[1] == "train":
            out = load_config(option(words, "--config"), overrides).output.dir
            if "--resume" in words:
                assert out in trained, words
            else:
                assert out not in trained, f"{words}: {out} holds an earlier example's run"
                trained.add(out)
        else:
            adapter = option(words, "--adapter")
            assert adapter is None or str(Path(adapter).parent) in trained, words


def test_the_set_up_says_what_each_long_step_does():
    """`pip install -q` printed nothing for a minute: each step is announced first."""
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:")[1].split("\n\n")[0]
    lines = [line.strip() for line in recipe.splitlines()[1:] if not line.strip().startswith("@#")]
    steps = [i for i, line in enumerate(lines)
             if re.search(r"\bpip\b|venv \$", line) and not line.startswith("@echo")]
    assert len(steps) == 5, lines
    for i in steps:  # announced, or the second command of an announced step
        assert lines[i - 1].startswith('@echo "set-up') or (
            i - 1 in steps and lines[i - 2].startswith('@echo "set-up')), lines
    # the suite names each test while it runs (some take a minute)
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest -v ", (ROOT / "Makefile").read_text(),
                     re.MULTILINE)


def test_the_readme_figures_are_what_the_script_measured():
    """The README's figures of a new user's machine are the block `scripts/measure_figures.py
    --write` renders from `docs/figures.json` (its date, machine and commit included), not
    figures typed by hand that drift."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import measure_figures
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    figures = json.loads((ROOT / "docs" / "figures.json").read_text())
    block = README.split(measure_figures.BEGIN)[1].split(measure_figures.END)[0]
    assert block.strip() == measure_figures.render(figures)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", figures["date"])
    assert {"setup", "demo"} <= set(figures)  # `make test` is measured after this test ran


def test_the_figures_script_reads_a_demo_run(tmp_path):
    """What `scripts/measure_figures.py` takes from `make demo`'s output and folder."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import measure_figures
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"time": "t", "step": s, "time/step_s": 1.5}) + "\n" for s in (1, 2)))
    (tmp_path / "eval.jsonl").write_text("".join(
        json.dumps({"tag": tag, "metrics": {"accuracy": acc, "time_s": 12.3}}) + "\n"
        for tag, acc in (("before", 0.2), ("after", 0.4))))
    output = ("actors up in 20 s; the sync probe's first scores ...\n"
              "placed: cpu layout, ...; up in 23 s: engines 20 s beside the learner 15 s; ...")
    assert measure_figures.demo_figures(output, tmp_path) == {
        "steps": 2, "train_s": 3.0, "step_s": 1.5, "startup_s": 23, "eval_s": [12.3, 12.3],
        "heldout_before": 0.2, "heldout_after": 0.4}
    events = [(1.0, "model.path=builtin:tiny-warm: building it once (...)"), (2.0, "warm-up: 1%"),
              (52.5, "starting a local Ray (2 CPUs) ...")]
    assert measure_figures.seconds_between(events, "building it once", "starting a local") == 51.5
    assert measure_figures.last_line(b"one\r\ntwo\r\n\r\nbar 1\rbar 2\r\n") == "bar 2"
    coloured = ("\x1b[33m========= \x1b[32m514 passed\x1b[0m, \x1b[33m\x1b[1m24 deselected"
                "\x1b[0m\x1b[33m in 908.26s (0:15:08)\x1b[0m\x1b[33m ==========\x1b[0m\r\n")
    assert measure_figures.pytest_summary("collected\r\n" + coloured) == (
        "514 passed, 24 deselected in 908.26s (0:15:08)")
