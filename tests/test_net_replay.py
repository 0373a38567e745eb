import time
from dataclasses import dataclass

import pytest

from ray_scout.net.errors import NetError
from ray_scout.net.replay import TraceReplay


@dataclass
class Trace:
    segments: list


class Recorder:
    def __init__(self):
        self.calls = []

    def set_rate(self, rate_bps):
        self.calls.append((time.monotonic(), rate_bps))
        return 0.0


def test_replay_applies_each_segment_on_time_and_logs_it():
    target = Recorder()
    trace = Trace([(0.0, 5e6), (0.05, 50e6), (0.1, 0.0)])
    replay = TraceReplay(target, trace).start()
    replay.join(2)
    assert [rate for _, rate in target.calls] == [5e6, 50e6, 8000]  # zero clipped to HTB's floor
    assert [c.trace_bps for c in replay.log] == [5e6, 50e6, 0.0]
    offsets = [t - target.calls[0][0] for t, _ in target.calls]
    assert offsets[1] == pytest.approx(0.05, abs=0.02) and offsets[2] == pytest.approx(0.1, abs=0.02)
    assert all(c.late_s < 0.02 for c in replay.log)


def test_stop_ends_replay_before_later_segments():
    target = Recorder()
    with TraceReplay(target, Trace([(0.0, 1e6), (30.0, 2e6)])):
        time.sleep(0.05)
    assert [rate for _, rate in target.calls] == [1e6]


def test_unsorted_trace_is_rejected():
    with pytest.raises(NetError, match="increasing"):
        TraceReplay(Recorder(), Trace([(1.0, 1e6), (0.5, 2e6)]))


def test_failing_target_surfaces_on_join():
    class Broken:
        def set_rate(self, rate_bps):
            raise OSError("link gone")

    replay = TraceReplay(Broken(), Trace([(0.0, 1e6)])).start()
    with pytest.raises(NetError, match="link gone"):
        replay.join(2)


def test_log_writes_csv(tmp_path):
    replay = TraceReplay(Recorder(), Trace([(0.0, 1e6)])).start()
    replay.join(2)
    replay.write_csv(tmp_path / "log.csv")
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("trace_t_s,late_s,wall_time_s")
