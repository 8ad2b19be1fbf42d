"""Connection recovery in a cluster, on the memory backplane: several nodes in this
process on one Clock, the store's history and sessions played by `MemoryBus` (what the
Lua scripts do, in Python). Every rule is driven deterministically (`bus.settle()`); the
same node-side code runs over real Redis in test_recovery_cluster_twistd.py."""

from __future__ import annotations

import json

import pytest

from iw_relay.registry import RoomRegistry
from tests import test_backplane_memory
from tests.members import Member
from tests.test_backplane_memory import Cluster

cluster = test_backplane_memory.cluster  # the fixture: nodes on one MemoryBus

WINDOW = 30.0


def op(n: int) -> bytes:
    return json.dumps({"type": "op", "n": n}, separators=(",", ":")).encode()


def node(cluster: Cluster, **settings: object) -> RoomRegistry:
    return cluster.node(recovery_window=WINDOW, **settings)


def seqs(member: Member) -> list[int]:
    return [m["seq"] for m in member.of("op")]


def resume(cluster: Cluster, registry: RoomRegistry, name: str, old: Member,
           since: int | None = None) -> Member:
    """A new connection named `name` resuming `old`'s session from the last seq it saw."""
    connected = old.of("connected")[-1]
    seen = [m["seq"] for m in old.delivered if "seq" in m and m["type"] != "connected"]
    if since is None:
        since = max([connected["seq"], *seen])
    member = Member(registry, name)
    assert registry.resume(member, "room", connected["resumeToken"], str(since),
                           connected["epoch"])
    return member


def test_one_room_order_on_every_node_and_the_same_seq(cluster):
    a, b = node(cluster), node(cluster)
    a1, a2 = cluster.join(a, "a1"), cluster.join(a, "a2")
    b1 = cluster.join(b, "b1")
    assert a1.of("connected")[0]["recovered"] is False
    for n in range(3):  # interleaved in one turn on two nodes
        a.broadcast(a1, op(n))
        b.broadcast(b1, op(10 + n))
    cluster.bus.settle()
    assert seqs(b1) == sorted(seqs(b1)) and len(seqs(b1)) == 3
    assert b1.ops() == [0, 1, 2]
    every = {m["n"]: m["seq"] for m in a2.of("op")}
    assert sorted(every) == [0, 1, 2, 10, 11, 12]
    assert seqs(a2) == sorted(seqs(a2)) == list(range(1, 7))  # one order: seq order
    assert {m["n"]: m["seq"] for m in a1.of("op")} == {n: every[n] for n in (10, 11, 12)}
    assert {m["n"]: m["seq"] for m in b1.of("op")} == {n: every[n] for n in (0, 1, 2)}


def test_resume_on_another_node_misses_nothing_and_peers_hear_nothing(cluster):
    a, b = node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.broadcast(a1, op(0))
    cluster.bus.settle()
    a.leave(a1, 1006)  # the network dropped it
    for n in range(1, 6):
        b.broadcast(b1, op(n))
    cluster.bus.settle()
    back = resume(cluster, b, "back", a1)
    cluster.bus.settle()
    connected = back.of("connected")[0]
    assert connected["recovered"] is True and back.connection_id == a1.connection_id
    assert back.ops() == [1, 2, 3, 4, 5]
    assert b1.presence() == [("connected", "b1", 2)]
    b.broadcast(b1, op(6))
    b.broadcast(back, op(7))
    cluster.bus.settle()
    assert back.ops() == [1, 2, 3, 4, 5, 6] and b1.ops()[-1] == 7
    assert b.recovery.stats.succeeded == 1
    cluster.clock.advance(WINDOW + 1)  # A's grace timer finds it claimed: no user-left
    cluster.bus.settle()
    assert b1.presence() == [("connected", "b1", 2)]
    assert "room" not in a.rooms  # A has no member there any more


def test_a_resume_after_its_node_died_misses_nothing(cluster):
    a, b, c = node(cluster), node(cluster), node(cluster)
    a1, b1, c1 = cluster.join(a, "a1"), cluster.join(b, "b1"), cluster.join(c, "c1")
    cluster.clock.pump([1.0] * 4)
    a.backplane._heartbeat.stop()
    cluster.bus.cut(a.backplane.node_id)  # killed: no leave, no goodbye
    for n in range(4):
        b.broadcast(b1, op(n))
        cluster.clock.advance(1.0)
        cluster.bus.settle()
    assert b.backplane.stats.deadNodesSeen == 1
    assert c1.kinds() == ["connected", "op", "op", "op", "op"]  # no user-left
    back = resume(cluster, c, "back", a1)
    cluster.bus.settle()
    assert back.of("connected")[0]["recovered"] is True
    assert back.ops() == [0, 1, 2, 3]
    cluster.clock.pump([1.0] * int(WINDOW + 2))
    cluster.bus.settle()
    assert "user-left" not in b1.kinds() and "user-left" not in c1.kinds()


def test_a_dead_node_s_member_that_does_not_come_back_leaves_after_the_window(cluster):
    a, b = node(cluster), node(cluster)
    cluster.join(a, "a1")
    b1 = cluster.join(b, "b1")
    cluster.clock.pump([1.0] * 4)
    a.backplane._heartbeat.stop()
    cluster.bus.cut(a.backplane.node_id)
    for _ in range(4):
        cluster.clock.advance(1.0)
        cluster.bus.settle()
    assert "user-left" not in b1.kinds()
    for _ in range(int(WINDOW) + 1):
        cluster.clock.advance(1.0)
        cluster.bus.settle()
    assert b1.presence()[-1] == ("user-left", "a1", 1)
    assert b1.kinds().count("user-left") == 1


def test_two_resumes_with_one_token_on_two_nodes_exactly_one_wins(cluster):
    a, b, c = node(cluster), node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.leave(a1, 1006)
    cluster.bus.settle()
    first, second = resume(cluster, b, "first", a1), resume(cluster, c, "second", a1)
    cluster.bus.settle()
    outcomes = sorted(m.of("connected")[0]["recovered"] for m in (first, second))
    assert outcomes == [False, True]
    loser = first if first.of("connected")[0]["recovered"] is False else second
    assert loser.connection_id != a1.connection_id
    assert sum(n.recovery.stats.failed["token_reused"] for n in (a, b, c)) == 1
    assert [p[0] for p in b1.presence()] == ["connected", "user-joined"]  # the loser


def test_a_resume_racing_the_grace_timer_the_deadline_wins(cluster):
    a, b = node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.leave(a1, 1006)
    cluster.bus.settle()
    cluster.clock.advance(WINDOW)  # the timer is due; the resume arrives in the same turn
    late = resume(cluster, b, "late", a1)
    cluster.bus.settle()
    assert late.of("connected")[0]["recovered"] is False
    assert b.recovery.stats.failed["session_ended"] == 1
    assert [p[:2] for p in b1.presence()] == [("connected", "b1"), ("user-left", "a1"),
                                              ("user-joined", late.connection_id)]


def test_the_window_expiring_says_user_left_once_on_every_node(cluster):
    a, b, c = node(cluster), node(cluster), node(cluster)
    a1, b1, c1 = cluster.join(a, "a1"), cluster.join(b, "b1"), cluster.join(c, "c1")
    a.leave(a1, 1006)
    cluster.clock.advance(WINDOW - 1)
    cluster.bus.settle()
    assert "user-left" not in b1.kinds() + c1.kinds()
    cluster.clock.advance(1)
    cluster.bus.settle()
    for peer in (b1, c1):
        assert peer.kinds().count("user-left") == 1
    late = resume(cluster, b, "late", a1)
    cluster.bus.settle()
    assert late.of("connected")[0]["recovered"] is False


@pytest.mark.parametrize("code", [1000, 1001])
def test_a_clean_client_close_leaves_at_once(cluster, code):
    a, b = node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.leave(a1, code)
    cluster.bus.settle()
    assert b1.presence()[-1] == ("user-left", "a1", 1)


def test_history_trimmed_means_recovered_false(cluster):
    a, b = node(cluster, recovery_max_messages=3), node(cluster, recovery_max_messages=3)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.leave(a1, 1006)
    for n in range(5):
        b.broadcast(b1, op(n))
    cluster.bus.settle()
    back = resume(cluster, b, "back", a1)
    cluster.bus.settle()
    assert back.of("connected")[0]["recovered"] is False
    assert back.connection_id != a1.connection_id
    assert b.recovery.stats.failed["history_trimmed"] == 1
    assert [p[0] for p in b1.presence()] == ["connected", "user-left", "user-joined"]


def test_unicast_is_kept_only_for_its_target(cluster):
    a, b = node(cluster), node(cluster)
    a1, b1, b2 = cluster.join(a, "a1"), cluster.join(b, "b1"), cluster.join(b, "b2")
    a.leave(a1, 1006)
    cluster.bus.settle()
    assert b.unicast(b1, a1.connection_id, op(1))  # a1 is away: it gets it on resume
    b.broadcast(b1, op(2))
    cluster.bus.settle()
    assert b2.ops() == [2]
    back = resume(cluster, b, "back", a1)
    cluster.bus.settle()
    assert back.ops() == [1, 2]
    b2_back = resume(cluster, a, "b2-back", b2, since=0)  # b2 never was owed op 1
    cluster.bus.settle()
    assert b2_back.of("connected")[0]["recovered"] is True
    assert b2_back.ops() == [2]  # from since=0: op 2 again, never op 1


def test_frames_sent_while_resuming_are_held_then_relayed_once(cluster):
    a, b = node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.leave(a1, 1006)
    cluster.bus.settle()
    back = resume(cluster, b, "back", a1)
    b.broadcast(back, op(9))  # before the claim is answered
    cluster.bus.settle()
    assert b1.ops() == [9]


def test_recovery_off_in_a_cluster_changes_nothing(cluster):
    a, b = cluster.node(), cluster.node()
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    a.broadcast(a1, op(1))
    cluster.bus.settle()
    assert "seq" not in b1.of("op")[0] and "epoch" not in a1.of("connected")[0]
    assert a._cluster is None and not cluster.bus.histories


def test_a_drop_the_store_did_not_hear_of_still_ends_after_the_window(cluster):
    a, b = node(cluster), node(cluster)
    a1, b1 = cluster.join(a, "a1"), cluster.join(b, "b1")
    cluster.bus.cut(a.backplane.node_id)
    a.leave(a1, 1006)  # away here; the store still has its session as present
    cluster.bus.restore(a.backplane.node_id)
    cluster.clock.advance(1)
    cluster.bus.settle()
    assert "user-left" not in b1.kinds()
    cluster.clock.advance(WINDOW)
    cluster.bus.settle()
    assert b1.presence()[-1] == ("user-left", "a1", 1)
    assert a.recovery.snapshot()["recoveryAwayMembers"] == 0


def test_a_member_of_an_expired_room_cannot_resume(cluster):
    a, b = node(cluster, room_expiry=50), node(cluster, room_expiry=50)
    a1 = cluster.join(a, "a1")
    cluster.join(b, "b1")
    cluster.clock.pump([10.0] * 6)
    assert a1.closed_with is not None and a1.closed_with[0] == 1000  # room-expired
    back = resume(cluster, b, "back", a1)
    cluster.bus.settle()
    assert back.of("connected")[0]["recovered"] is False
    assert b.recovery.stats.failed["session_ended"] == 1
