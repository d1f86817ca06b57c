"""scripts/stepprofile.py's accounting on a fake clock: each part's time counted once, in the innermost timed part, and a
model call made by the learner counted as training, not as sampling. (Its figures are measured, never asserted.)"""
import scripts.stepprofile as stepprofile
from scripts.stepprofile import LOOP, PARTS, Timers

STEP, DECODE, TRAIN = PARTS[0][0], "sampling: packed decode step", "training: GRPO learner step"


def test_each_second_is_counted_once_and_where_it_was_spent(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(stepprofile.time, "perf_counter", lambda: clock[0])

    def spend(s):
        clock[0] += s
    t = Timers()
    decode = t.wrap(DECODE, lambda: spend(2.0))
    loop = t.wrap(LOOP, lambda: (spend(1.0), decode(), decode()))
    learner = t.wrap(TRAIN, lambda: (spend(3.0), decode()))  # the learner runs the model's code too
    step = t.wrap(STEP, lambda: (spend(0.5), loop(), learner(), {"seconds": clock[0]})[-1])
    step()
    decode()  # outside a step and outside the sampler: not counted anywhere
    step()
    assert len(t.steps) == 2 and t.steps[1]["metrics"] == {"seconds": 23.0}
    for s in t.steps:
        assert s["parts"] == {STEP: 0.5, LOOP: 1.0, DECODE: 4.0, TRAIN: 5.0}, s["parts"]
        assert sum(s["parts"].values()) == 10.5, "the parts add up to the step"
