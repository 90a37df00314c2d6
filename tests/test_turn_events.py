"""A streamed turn's event log: written without waiting for readers, read by each at its own pace,
and bounded however slowly they read."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.turn_events import EventsDropped, TurnEventLog, TurnEventLogs
from service.turns._stream import relay

TURN = "turn_" + "0" * 30


def delta(n: int) -> dict[str, object]:
    return {"turn_id": TURN, "index": 0, "delta": {"type": "text", "text": f"word {n} " * 10}}


def numbers(events: list[bytes]) -> list[str]:
    return [e.split(b"\n", 1)[0].decode().removeprefix("id: ") for e in events]


async def test_readers_get_every_event_in_order_as_it_comes() -> None:
    log = TurnEventLog("t", "c", TURN, max_bytes=1_000_000)
    log.append("turn.started", {"turn_id": TURN})
    early = asyncio.create_task(_read(log, 0))
    for n in range(50):
        log.append("step.delta", delta(n))
        if n % 7 == 0:
            await asyncio.sleep(0)
    log.append("turn.completed", {"turn_id": TURN})
    log.close()
    got = await early
    assert numbers(got) == [str(n) for n in range(1, 53)]
    assert numbers(await _read(log, 40)) == [str(n) for n in range(41, 53)]


async def _read(log: TurnEventLog, after: int) -> list[bytes]:
    return [event async for event in log.follow(after)]


async def test_the_log_is_bounded_and_a_reader_left_behind_is_told() -> None:
    """The writer never waits: 10,000 deltas into a 64 KiB log keep it under 64 KiB (plus
    turn.started). A reader that had read only turn.started is told its events were dropped;
    a new reader from the start gets turn.started, then the same."""
    log = TurnEventLog("t", "c", TURN, max_bytes=64 * 1024)
    log.append("turn.started", {"turn_id": TURN})
    slow = log.follow(0)
    assert numbers([await anext(slow)]) == ["1"]
    for n in range(10_000):
        log.append("step.delta", delta(n))
        assert log.size <= 64 * 1024 + 200
    log.append("turn.completed", {"turn_id": TURN})
    log.close()
    with pytest.raises(EventsDropped):
        await anext(slow)
    relayed = [event async for event in relay(log, 0)]
    assert numbers(relayed[:1]) == ["1"]
    last = json.loads(relayed[-1].split(b"data: ", 1)[1])
    assert last == {"type": "error", "turn_id": TURN, "code": "events_dropped"}
    # A reader that keeps up with the tail still gets the end.
    assert b"turn.completed" in (await _read(log, int(numbers([relayed[0]])[0]) + 9_990))[-1]


async def test_ended_logs_are_kept_a_while_then_forgotten() -> None:
    logs = TurnEventLogs(keep_seconds=0.01)
    log = logs.open("t", "c", TURN)
    log.append("turn.started", {"turn_id": TURN})
    logs.ended(log)
    assert logs.get(TURN) is log
    assert log.closed
    await asyncio.sleep(0.05)
    assert logs.get(TURN) is None
