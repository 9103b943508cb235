import math

import pytest
import torch

from shoal.comm.wire import WireMeter, _union_length
from shoal.config import ScheduleConfig
from shoal.engine.optim import lr_factor


def test_union_of_in_flight_intervals_counts_overlap_once():
    assert _union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4)
    assert _union_length([]) == 0


def test_wire_meter_counts_tensor_bytes_per_step_and_in_total():
    meter = WireMeter()
    started = meter.sent([torch.zeros(10, dtype=torch.float16), torch.zeros(3, dtype=torch.int64)], dense_numel=10)
    meter.done(started)
    step = meter.take()
    assert step.wire_bytes == 10 * 2 + 3 * 8 and step.dense_bytes == 40 and step.collectives == 1
    assert meter.take().wire_bytes == 0 and meter.total.wire_bytes == 44


def test_lr_schedules():
    cosine = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cosine, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cosine, 9, 110) == pytest.approx(1.0)
    assert lr_factor(cosine, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cosine, 110, 110) == pytest.approx(0.1)
    step = ScheduleConfig(name="step", step_size=5, gamma=0.5)
    assert [lr_factor(step, s, 100) for s in (0, 4, 5, 10)] == [1, 1, 0.5, 0.25]
    assert lr_factor(ScheduleConfig(name="constant"), 50, 100) == 1
