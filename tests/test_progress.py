"""The driver's progress (`jobs.run.Progress`) off a terminal, where Ray Jobs logs and files read
it: one line per interval or per share of the records, not one per event; and an ETA that weighs
each method by its own cost. The clock is injected, so nothing waits."""

from __future__ import annotations

import io

import pytest

from jobs.run import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_one_line_per_interval_or_share_of_records():
    # 200 records; every_n = 10% = 20 records. A slow minute (one event a second, a record every
    # 2 s): a bar redrawn per event writes 60 times, the lines come every 30 s (t = 30, 60). Then
    # a burst of 10 records a second: a line per 20 records since the last (at 50 and 70).
    clock, out = Clock(), io.StringIO()
    progress = Progress({"cot": 200}, 0, "run-1", stream=out, clock=clock, every_s=30)
    done = 0
    for t in range(1, 66):
        clock.now += 1
        new = (t % 2 == 0) if t <= 60 else 10
        done += new
        progress.recorded_batch("cot", new, 1.0 * new)
        progress.update(done, acc="0.500")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no bar drawing
    assert [line.split(" rec")[0] for line in lines] == [
        f"run-1: {n}/200" for n in (15, 30, 50, 70)
    ]
    assert lines[0].startswith("run-1: 15/200 rec (8%) [0m30s elapsed; cot 15/200] eta=")
    progress.close()  # the closing line says where it stopped
    last = out.getvalue().splitlines()[-1]
    # 80 records in 65 s, 120 left at the same cost per record: 97.5 s.
    assert last == "run-1: 80/200 rec (40%) [1m05s elapsed; cot 80/200] eta=1m38s, acc=0.500"


def test_a_disabled_progress_writes_nothing():
    out = io.StringIO()
    progress = Progress({"cot": 2}, 0, "run", enabled=False, stream=out, clock=Clock())
    progress.recorded_batch("cot", 2, 1.0)
    progress.update(2)
    progress.close()
    assert out.getvalue() == ""


def test_eta_weighs_each_method_by_its_own_cost():
    # `make run`'s shape: 10 CoT records at 6 s each, then LatentSeek at 98 s each.
    clock = Clock()
    progress = Progress({"cot": 10, "latentseek": 10}, 0, "run", stream=io.StringIO(),
                        clock=clock)  # fmt: skip
    assert progress.eta() == (None, False)  # nothing recorded: no estimate
    clock.now += 60
    progress.recorded_batch("cot", 10, 60.0)
    # No LatentSeek record yet: weighted as the costliest seen (CoT), shown as a lower bound.
    assert progress.eta() == (pytest.approx(60.0), True)
    clock.now += 98
    progress.recorded_batch("latentseek", 1, 98.0)
    # Elapsed 158 s bought 10 x 6 + 1 x 98 = 158 s of recorded cost; 9 LatentSeek records are
    # left: 9 x 98 = 882 s. A count-based rate (11 records in 158 s) would say 129 s.
    eta, lower = progress.eta()
    assert (eta, lower) == (pytest.approx(882.0), False)
    progress.update(11)
    assert "eta=14m42s" in progress.postfix


def test_eta_counts_records_alike_when_no_cost_was_recorded():
    clock = Clock()
    progress = Progress({"sc": 4}, 2, "run", stream=io.StringIO(), clock=clock)
    clock.now += 10
    progress.recorded_batch("sc", 2, 0.0)  # a record without a wall time (a stand-in worker)
    assert progress.eta() == (pytest.approx(10.0), False)


def test_on_a_terminal_the_bar_shows_the_weighted_eta():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = Clock(), Terminal()
    progress = Progress({"cot": 2, "latentseek": 2}, 0, "run", stream=out, clock=clock)
    clock.now += 10
    progress.recorded_batch("cot", 2, 10.0)
    progress.update(2, acc="1.000")
    progress.close()
    assert "2/4" in out.getvalue() and "eta=>=0m10s, acc=1.000" in out.getvalue()
