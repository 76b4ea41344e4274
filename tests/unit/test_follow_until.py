"""The reconnect loop serving's background consumers run on (a stand-in follower: pure logic)."""

from __future__ import annotations

import threading

from freshrec.consumer import Message, follow_until


class FlakyFollower:
    def __init__(self, log: list[str], fail_on: int) -> None:
        self.log = log
        self.fail_on = fail_on
        self.polls = 0

    def poll(self, timeout_s: float) -> list[Message]:
        self.polls += 1
        if self.polls == self.fail_on:
            raise ConnectionError("broker went away")
        return [Message(0, self.polls, None, b"v", 0)]

    def close(self) -> None:
        self.log.append("closed")


def test_reopens_after_an_error_and_stops_cleanly() -> None:
    stop = threading.Event()
    log: list[str] = []
    opened: list[FlakyFollower] = []
    seen: list[int] = []
    errors: list[Exception] = []

    def open_follower() -> FlakyFollower:
        follower = FlakyFollower(log, fail_on=2 if not opened else 0)
        opened.append(follower)
        log.append("opened")
        return follower

    def on_poll(_f: object, messages: list[Message]) -> None:
        seen.extend(m.offset for m in messages)
        if len(opened) == 2 and len(seen) >= 3:
            stop.set()

    follow_until(stop, open_follower, on_poll, errors.append, poll_s=0.0, retry_s=0.0)  # type: ignore[arg-type]

    assert [type(e) for e in errors] == [ConnectionError]
    assert log == ["opened", "closed", "opened", "closed"]  # the broken one closed, the last one too
    assert seen == [1, 1, 2]  # first follower's poll 1, then the new follower from its start
