"""The cluster recovery scripts (iw_relay/backplane/lua/session_*.lua, sequence.lua)
through `RedisStore`, against a real redis-server on loopback: the same answers as the
memory bus gives in test_recovery_cluster.py."""

from __future__ import annotations

import json

import pytest_twisted
import txredisapi
from twisted.internet import reactor

from iw_relay.backplane.redis import RedisStore
from iw_relay.backplane.shared import Claimed, HistoryLimits, Replay

KEY = "ab" * 16
A, B, C = "a" * 16, "b" * 16, "c" * 16
NODE_1, NODE_2 = "1" * 16, "2" * 16
LIMITS = HistoryLimits(window_ms=30_000, max_messages=100, max_bytes=1 << 20,
                       head_ttl_ms=3_600_000)


async def store_on(redis_server) -> tuple[RedisStore, object]:
    connection = await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False,
                                             charset=None, convertNumbers=False)
    store = RedisStore(redis_server.url, reactor, reply_timeout=5)
    store.commands = connection  # the store's command link, without its services
    return store, connection


def op(n: int) -> bytes:
    return json.dumps({"type": "op", "n": n}, separators=(",", ":")).encode()


@pytest_twisted.ensureDeferred
async def test_one_token_claims_once_and_the_window_decides(redis_server):
    store, connection = await store_on(redis_server)
    try:
        epoch, seq = await store.open_session(NODE_1, KEY, A, LIMITS)
        assert (len(epoch), seq) == (16, 0)
        await store.sequence(NODE_1, KEY, [B, "", op(1), B, A, op(2), B, C, op(3)], LIMITS)
        await store.drop_session(NODE_1, KEY, A, True, LIMITS)
        ttl = int(redis_server.command("PTTL", f"iwrelay:s:{KEY}:{A}")[1:])
        assert 0 < ttl <= 30_000  # away: the window is its deadline
        first, second = (store.claim_session(NODE_2, KEY, A, 0, LIMITS),
                         store.claim_session(NODE_2, KEY, A, 0, LIMITS))
        won, lost = await first, await second
        assert isinstance(won, Claimed) and (won.generation, won.joined_seq) == (1, 0)
        assert lost == "token_reused"
        replay = await store.history_since(KEY, 0, epoch, A, LIMITS)
        assert isinstance(replay, Replay) and replay.last_seq == 3
        assert [json.loads(f) for f in replay.frames] == [
            {"type": "op", "n": 1, "seq": 1}, {"type": "op", "n": 2, "seq": 2}]  # not C's
        # The node it dropped from finds it moved: not gone. The node holding it ends it.
        assert await store.close_session(NODE_1, KEY, A) is False
        assert await store.close_session(NODE_2, KEY, A) is True
        assert await store.claim_session(NODE_2, KEY, A, 1, LIMITS) == "session_ended"
        assert await store.history_since(KEY, 0, "0" * 16, A, LIMITS) == "epoch_changed"
        keys = redis_server.keys()
        assert keys and all(int(redis_server.command("PTTL", k)[1:]) > 0
                            for k in keys if k.startswith("iwrelay:h:"))
    finally:
        await store.disconnect()  # its reply watchdog too
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_clean_close_ends_the_session_and_only_its_node_can(redis_server):
    store, connection = await store_on(redis_server)
    try:
        await store.open_session(NODE_1, KEY, A, LIMITS)
        await store.drop_session(NODE_2, KEY, A, False, LIMITS)  # not its node: nothing
        assert isinstance(await store.claim_session(NODE_1, KEY, A, 0, LIMITS), Claimed)
        await store.drop_session(NODE_1, KEY, A, False, LIMITS)
        assert await store.claim_session(NODE_1, KEY, A, 1, LIMITS) == "session_ended"
    finally:
        await store.disconnect()  # its reply watchdog too
        await connection.disconnect()
