"""What a newcomer sees: `grpo-ray train` on a terminal (a pseudo-terminal, as from a shell)
shows only the driver's own lines, the metrics table unbroken and a progress bar; the actors'
output (vLLM, transformers, Ray) is in `<output.dir>/logs/`, or on the console with --verbose."""
import json
import os
import re
import subprocess
import sys

from helpers import run_in_terminal, terminal_screen

from grpo_ray.config import load_config
from grpo_ray.driver.tracking import TABLE, table_legend

HEADER = " ".join(f"{h:>{len(f.format(0.0))}}" for _, h, f, _ in TABLE)
ROW = re.compile(r"^ +(\d+) +-?\d+\.\d{3} ")


VLLM_OUTPUT = r"Initializing a V1 LLM engine|Loading safetensors checkpoint shards"


def grpo_ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_ray", *args, "--config", "configs/tiny-cpu.yaml"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_train_on_a_terminal_is_quiet_with_a_bar_and_an_unbroken_table(tiny_model_path,
                                                                         tmp_path):
    """On an 80-column terminal: a line before each long stretch says what runs, the table's
    rows are whole, the bar shows step, reward and accuracy, and every line printed after it
    (the checkpoint, the final evaluation, the list of outputs) starts at column 0."""
    out = tmp_path / "run"
    code, text = run_in_terminal(
        grpo_ray("train") + [f"model.path={tiny_model_path}", f"output.dir={out}",
                             "algorithm.total_steps=2", "logging.tensorboard=false"],
        timeout=600, env=clean_env(), columns=80)
    assert code == 0, text[-5000:]
    # what the terminal holds, each of our lines whole (not wrapped at 80 columns: where a line
    # starts is the point here)
    shown = [line for line in terminal_screen(text, 1000) if line.strip()]

    # only our own lines before the table, each said before what it waits for: Ray, where
    # worker logs go, the actors, the sync probe's first scores, placement, the first evaluation
    header = shown.index(HEADER)
    legend = table_legend()
    assert shown[header - len(legend):header] == legend
    assert [line.split(" ")[0] for line in shown[:header - len(legend)]] == [
        "starting", "worker", "starting", "actors", "placed:", "evaluating", "eval"], shown
    assert shown[0] == "starting a local Ray (2 CPUs) ..."
    assert shown[1] == (f"worker logs (vLLM, transformers, Ray): {out}/logs/ "
                        "(--verbose prints them here)")
    assert shown[2] == ("starting the actors: 1 learner, 1 rollout engine (vLLM), 2 reward "
                        "workers ...")  # within 80 columns
    # the rows right under the header, whole, then the bar's final state under them: within
    # 80 columns, its figures whole
    rows = shown[header + 1:header + 3]
    assert [ROW.match(r).group(1) for r in rows if ROW.match(r)] == ["1", "2"], shown
    assert all(len(r) == len(HEADER) <= 80 for r in rows), rows
    bar = shown[header + 3]
    assert re.match(r"step 2/2 reward -?\d\.\d{3} acc \d\.\d\d \|.{5,}\| ", bar), bar
    assert len(bar) <= 80
    # the bar was drawn and redrawn over itself while the run went on
    assert set(re.findall(r"\rstep (\d)/2 reward", text)) == {"0", "1", "2"}
    # every line after the bar starts a line of its own
    after = shown[header + 4:]
    assert after[0] == f"checkpoint of step 2 written to {out / 'checkpoints' / 'step-000002'}"
    assert after[1].startswith("evaluating the trained adapter, after step 2: 16 held-out")
    assert after[2].startswith("eval after (step 2, adapter version 2")
    assert after[-1].startswith("  logs/") and f"written to {out}/:" in after
    assert not [line for line in after if "step 2/2 reward" in line], after
    # nothing of Ray's or vLLM's on the console, no runs of blank lines
    assert not [line for line in shown if re.search(rf"pid=|INFO|WARNING|{VLLM_OUTPUT}", line)]
    assert "\n\n\n" not in text.replace("\r", "")

    logs = {p.name.rsplit("-", 1)[0]: p for p in (out / "logs").iterdir()}
    assert set(logs) == {"learner", "rollout-0", "reward"}, logs
    # vLLM's own output (its INFO line is missing from the file in some full-suite runs, while
    # its loader's progress is always there)
    assert re.search(VLLM_OUTPUT, logs["rollout-0"].read_text())
    assert len(list((out / "logs").glob("reward-*.log"))) == 2
    # the run's folder, readable without the source: the config as resolved, at its top
    assert load_config(out / "config.yaml").to_dict() == load_config(
        "configs/tiny-cpu.yaml", [f"model.path={tiny_model_path}", f"output.dir={out}",
                                  "algorithm.total_steps=2", "logging.tensorboard=false"]
    ).resolved()


def test_eval_verbose_forwards_worker_output_to_the_console(tiny_model_path, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run(
        grpo_ray("eval", "--verbose") + [f"model.path={tiny_model_path}", f"output.dir={out}",
                                         "eval.num_samples=2"],
        env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert re.search(r"\(RolloutWorker pid=\d+\)", console) and re.search(VLLM_OUTPUT, console)
    assert "worker logs" not in console and not (out / "logs").exists()
    assert json.loads((out / "eval-base.jsonl").read_text().splitlines()[-1])["adapter"] is None
    # a line before each long stretch: the engine's start, the evaluation
    assert "starting 1 rollout engine(s) (vLLM) ..." in console
    assert "evaluating the base model: 2 held-out prompts greedy ..." in console
