"""The train stream's next pass starts while the current pass's last batches train (NextPass)."""
import threading

import pytest

from orchestrator.train.streams import NextPass


class Passes:
    """Passes of ``n`` batches; records when each pass started and which batch was yielded when."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.events = n, fail_at, []
        self.lock = threading.Lock()

    def start(self, epoch):
        with self.lock:
            self.events.append(("start", epoch))
        if epoch == self.fail_at:
            raise RuntimeError(f"pass {epoch} broke")
        return iter([(epoch, i) for i in range(self.n)])

    def announce(self, epoch):
        self.events.append(("announce", epoch))


def _run(next_pass, passes, epochs):
    got = []
    for e in range(epochs):
        for batch in next_pass.hold_back(e):
            with passes.lock:
                passes.events.append(("train", batch))
            got.append(batch)
    return got


def test_the_next_pass_starts_while_the_last_held_batches_train():
    passes = Passes(5)
    nxt = NextPass(passes.start, passes.announce, wanted=lambda e: True, hold=2)
    got = _run(nxt, passes, 3)
    assert got == [(e, i) for e in range(3) for i in range(5)]  # every batch once, in order
    ev = passes.events
    assert [x for x in ev if x[0] == "start"] == [("start", 0), ("start", 1), ("start", 2), ("start", 3)]
    for e in (1, 2):  # announced, then started, before the last 2 batches of the pass before it trained
        assert ev.index(("announce", e)) < ev.index(("start", e)) < ev.index(("train", (e - 1, 3)))
        assert ev.index(("train", (e - 1, 2))) < ev.index(("announce", e))  # only once the source was read


def test_no_pass_is_started_ahead_unless_the_run_wants_it_or_with_nothing_held():
    passes = Passes(3)
    _run(NextPass(passes.start, passes.announce, wanted=lambda e: e < 1, hold=1), passes, 2)
    assert [x for x in passes.events if x[0] != "train"] == [("start", 0), ("start", 1)]  # started when asked
    passes = Passes(3)
    got = _run(NextPass(passes.start, passes.announce, wanted=lambda e: True, hold=0), passes, 2)
    assert len(got) == 6 and not [x for x in passes.events if x[0] == "announce"]


def test_a_pass_started_ahead_that_fails_raises_where_it_is_taken():
    passes = Passes(3, fail_at=1)
    nxt = NextPass(passes.start, passes.announce, wanted=lambda e: True, hold=1)
    assert len(list(nxt.hold_back(0))) == 3  # the pass before it trains to its end
    with pytest.raises(RuntimeError, match="pass 1 broke"):
        list(nxt.hold_back(1))


def test_a_pass_shorter_than_the_held_batches_and_an_empty_started_pass():
    passes = Passes(1)
    nxt = NextPass(passes.start, passes.announce, wanted=lambda e: True, hold=4)
    assert _run(nxt, passes, 2) == [(0, 0), (1, 0)]
    passes = Passes(0)
    assert _run(NextPass(passes.start, passes.announce, wanted=lambda e: True, hold=2), passes, 2) == []
