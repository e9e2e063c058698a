"""benchmarks/scaling_model.py: hand-computed steps with and without overlap, where the learner
becomes the limit, and docs/scaling.md's table as the model prints it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scaling_model import StageTimes, engines_to_saturate, predict, table  # noqa: E402

TIMES = StageTimes(generate=4.0, reward=0.2, learner=2.5, sync=0.1)


def test_serial_step_adds_the_stages_and_splits_generation():
    one = predict(TIMES, engines=1, overlap=False, tokens=32768)
    assert one.step_s == pytest.approx(4.0 + 0.2 + 2.5 + 0.1)
    two = predict(TIMES, engines=2, overlap=False, tokens=32768)
    assert two.step_s == pytest.approx(2.0 + 0.2 + 2.5 + 0.1)
    assert two.learner_busy == pytest.approx(2.5 / 4.8)
    assert two.engine_busy == pytest.approx(2.0 / 4.8)
    assert two.tokens_per_s_per_gpu == pytest.approx(32768 / 4.8 / 3)


def test_overlap_takes_the_longer_side_and_stops_helping_once_the_learner_limits():
    assert predict(TIMES, 1, True, 1).step_s == pytest.approx(4.2 + 0.1)   # rollout-bound
    assert predict(TIMES, 2, True, 1).step_s == pytest.approx(2.5 + 0.1)   # learner-bound
    three = predict(TIMES, 3, True, 1)
    assert three.step_s == pytest.approx(2.6) and three.learner_busy == pytest.approx(2.5 / 2.6)
    # one step off is never slower than serial
    for n in range(1, 6):
        assert predict(TIMES, n, True, 1).step_s <= predict(TIMES, n, False, 1).step_s
    assert engines_to_saturate(TIMES) == 2  # 4.0 / 2 + 0.2 <= 2.5 first at two engines
    with pytest.raises(ValueError):
        predict(TIMES, 0, True, 1)


def test_the_docs_table_is_the_models():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| Unsloth |")
            or line.startswith("| bnb + PEFT |")]
    assert len(rows) >= 6
    printed = table().splitlines()
    for row in rows:
        assert row in printed, row
