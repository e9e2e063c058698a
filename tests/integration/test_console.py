"""What a newcomer sees: `grpo-ray train` on a terminal (a pseudo-terminal, as from a shell)
shows only the driver's own lines, the metrics table unbroken and a progress bar; the actors'
output (vLLM, transformers, Ray) is in `<output.dir>/logs/`, or on the console with --verbose."""
import json
import os
import re
import subprocess
import sys

from helpers import run_in_terminal, screen_lines

from grpo_ray.driver.tracking import TABLE

HEADER = " ".join(f"{h:>{len(f.format(0.0))}}" for _, h, f in TABLE)
ROW = re.compile(r"^ +(\d+) +-?\d+\.\d{3} ")


VLLM_OUTPUT = r"Initializing a V1 LLM engine|Loading safetensors checkpoint shards"


def grpo_ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_ray", *args, "--config", "configs/tiny-cpu.yaml"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_train_on_a_terminal_is_quiet_with_a_bar_and_an_unbroken_table(tiny_model_path,
                                                                         tmp_path):
    out = tmp_path / "run"
    code, text = run_in_terminal(
        grpo_ray("train") + [f"model.path={tiny_model_path}", f"output.dir={out}",
                             "algorithm.total_steps=2", "logging.tensorboard=false"],
        timeout=600, env=clean_env())
    assert code == 0, text[-5000:]
    shown = [line for line in screen_lines(text) if line.strip()]

    # only our own lines before the table: where worker logs go, placement, first evaluation
    header = shown.index(HEADER)
    assert [line.split(" ")[0] for line in shown[:header]] == ["worker", "placed:", "eval"], shown
    assert shown[0] == (f"worker logs (vLLM, transformers, Ray): {out}/logs/ "
                        "(--verbose prints them here)")
    # the rows right under the header, whole, then the bar's final state under them
    rows = shown[header + 1:header + 3]
    assert [ROW.match(r).group(1) for r in rows if ROW.match(r)] == ["1", "2"], shown
    assert all(len(r) == len(HEADER) for r in rows), rows
    assert re.match(r"grpo: 100%\|.*\| 2/2 \[.*(step/s|s/step), reward=", shown[header + 3])
    # the bar was drawn and redrawn over itself while the run went on
    assert set(re.findall(r"\rgrpo:\s+\d+%\|[^|]*\| (\d)/2 ", text)) == {"0", "1", "2"}
    # nothing of Ray's or vLLM's on the console
    assert not [line for line in shown[1:] if re.search(r"pid=|INFO|WARNING|vLLM", line)], shown

    logs = {p.name.rsplit("-", 1)[0]: p for p in (out / "logs").iterdir()}
    assert set(logs) == {"learner", "rollout-0", "reward"}, logs
    # vLLM's own output (its INFO line is missing from the file in some full-suite runs, while
    # its loader's progress is always there)
    assert re.search(VLLM_OUTPUT, logs["rollout-0"].read_text())
    assert len(list((out / "logs").glob("reward-*.log"))) == 2


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
