"""RedisHistory (iw_relay/backplane/history.py) against a real redis-server on loopback:
the same answers as the one-node RoomHistory, with the seq taken in Redis."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.task import Clock

from iw_relay.backplane.history import RedisHistory, history_keys
from iw_relay.recovery import RecoveryFailure


async def history(redis_server, clock: Clock, **bounds) -> tuple[RedisHistory, object]:
    import txredisapi

    connection = await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False)
    settings = {"window": 30.0, "max_messages": 1000, "max_bytes": 1 << 20,
                "head_ttl": 3600.0, **bounds}
    return RedisHistory(connection.eval, clock, **settings), connection


def op(n: int, pad: str = "") -> bytes:
    return json.dumps({"type": "op", "n": n, "pad": pad}, separators=(",", ":")).encode()


@pytest_twisted.ensureDeferred
async def test_seq_epoch_and_what_a_member_is_owed(redis_server):
    clock = Clock()
    store, connection = await history(redis_server, clock)
    try:
        head = await store.head("room")
        assert head.seq == 0 and len(head.epoch) == 16
        assert (await store.head("room")).epoch == head.epoch  # every node agrees
        kept = [await store.append("room", op(n), "a" * 16 if n % 2 else "b" * 16, None)
                for n in range(4)]
        assert [entry.seq for entry in kept] == [1, 2, 3, 4]
        assert json.loads(kept[2].frame) == {"type": "op", "n": 2, "pad": "", "seq": 3}
        await store.append("room", op(9), "b" * 16, "a" * 16)  # for a only
        await store.append("room", op(8), "b" * 16, "c" * 16)  # never for a
        frames = await store.since("room", 1, head.epoch, "a" * 16)
        assert [json.loads(f)["n"] for f in frames] == [2, 9]  # not its own, not c's
        assert await store.since("room", 6, head.epoch, "a" * 16) == []
        assert await store.since("room", 7, head.epoch, "a" * 16) is RecoveryFailure.BAD_SINCE
        assert (await store.since("room", 0, "0" * 16, "a" * 16)
                is RecoveryFailure.EPOCH_CHANGED)
        await store.drop("room")
        assert (await store.head("room")).epoch != head.epoch  # a new stream
        # Keys are hashes: the room id is no Redis key.
        keys = [k if isinstance(k, str) else k.decode() for k in await connection.keys("*")]
        assert keys and not any("room" in key for key in keys)
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_trimmed_by_count_bytes_and_age_with_ttls(redis_server):
    clock = Clock()
    store, connection = await history(redis_server, clock, max_messages=3, max_bytes=200)
    try:
        epoch = (await store.head("r")).epoch
        for n in range(5):
            await store.append("r", op(n), "b" * 16, None)
        assert await store.since("r", 1, epoch, "a" * 16) is RecoveryFailure.HISTORY_TRIMMED
        assert len(await store.since("r", 2, epoch, "a" * 16)) == 3
        await store.append("r", op(5, "x" * 150), "b" * 16, None)  # bytes: 1 entry left
        assert await store.since("r", 4, epoch, "a" * 16) is RecoveryFailure.HISTORY_TRIMMED
        assert len(await store.since("r", 5, epoch, "a" * 16)) == 1
        clock.advance(31)  # older than the window
        assert await store.since("r", 5, epoch, "a" * 16) is RecoveryFailure.HISTORY_TRIMMED
        stream, _, epoch_key, _ = history_keys("r")
        assert 0 < await connection.execute_command("PTTL", stream) <= 30_000
        assert 30_000 < await connection.execute_command("PTTL", epoch_key) <= 3_600_000
    finally:
        await connection.disconnect()
