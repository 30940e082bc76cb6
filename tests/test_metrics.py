"""metrics.MetricsWriter across resumes, read back the way TensorBoard reads it."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flax_train.metrics import MetricsWriter


def test_resumed_runs_leave_one_row_per_step_in_tensorboard_and_jsonl(tmp_path):
    # A run logs steps 1-6 and dies after its checkpoint of step 2; the next resumes from 2 and
    # dies at 5 after a checkpoint at 4; the last resumes from 4 and ends at 8.
    runs = [(0, 6), (2, 5), (4, 8)]
    for index, (start, end) in enumerate(runs):
        writer = MetricsWriter(tmp_path, start_step=start, tensorboard=True)
        for step in range(start + 1, end + 1):
            writer.scalars(step, {"loss": 10.0 * index + step})
        writer.close()
    # Each step as the last run that did it logged it.
    expected = {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0, 5: 25.0, 6: 26.0, 7: 27.0, 8: 28.0}

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"]: row["loss"] for row in rows} == expected and len(rows) == len(expected)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()  # TensorBoard's own reader: it applies the purges the later event files ask for
    scalars = events.Scalars("loss")
    assert {e.step: e.value for e in scalars} == expected and len(scalars) == len(expected)
