"""Property: whatever the interleaving of sends, drops (with frames lost in flight),
resumes, takeovers, trims and the passing of time, a resume gives the member every
message meant for it after its ``since``, once, in order; or it fails with a reason
the situation justifies, and the member starts afresh."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock

from iw_relay import messages
from iw_relay.recovery import Recovery, RecoveryFailure, Resumed

ROOM = "prop-room"
WINDOW = 10.0
PEOPLE = 3


@dataclass
class Person:
    cid: str = ""
    state: str = "left"  # present, away, left
    fields: dict = field(default_factory=dict)
    joined_seq: int = 0
    delivered: list[tuple[int, int]] = field(default_factory=list)  # (seq, message id)
    in_flight: list[tuple[int, int]] = field(default_factory=list)
    away_since: float = 0.0

    @property
    def last_seq(self) -> int:
        return self.delivered[-1][0] if self.delivered else self.fields["seq"]


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.gone: list[str] = []
        self.recovery = Recovery(self.clock, WINDOW, max_messages=12, max_bytes=2000,
                                 gone=lambda room, cid: self.gone.append(cid))
        self.people = [Person() for _ in range(PEOPLE)]
        self.log: list[tuple[int, str, str | None, int]] = []  # seq, sender, target, id
        self.next_cid = 0
        self.next_id = 0
        self.ended: set[str] = set()
        self.resumed_ok = 0
        self.stale: list[tuple[str, dict]] = []  # (cid, connected fields) of ended members
        for person in self.people:
            self._join(person)

    def _join(self, person: Person) -> None:
        self.next_cid += 1
        person.cid = f"{self.next_cid:016x}"
        person.fields = self.recovery.joined(ROOM, person.cid)
        person.state = "present"
        person.joined_seq = person.fields["seq"]
        person.delivered, person.in_flight = [], []

    def _owed(self, person: Person) -> list[tuple[int, int]]:
        return [(seq, ident) for seq, sender, target, ident in self.log
                if seq > person.joined_seq and sender != person.cid
                and (target is None or target == person.cid)]

    def _sync_gone(self) -> None:
        for person in self.people:
            if person.cid in self.gone and person.state == "away":
                self._end(person)

    def _end(self, person: Person) -> None:
        person.state = "left"
        self.ended.add(person.cid)
        self.stale.append((person.cid, person.fields))

    @rule(sender=st.integers(0, PEOPLE - 1), to=st.none() | st.integers(0, PEOPLE - 1),
          size=st.integers(0, 150))
    def send(self, sender: int, to: int | None, size: int) -> None:
        person = self.people[sender]
        if person.state != "present":
            return
        target = None if to is None else self.people[to].cid
        if target == person.cid:
            return
        self.next_id += 1
        payload = messages.encode({"type": "op", "id": self.next_id, "pad": "x" * size,
                                   "connectionId": person.cid})
        sent = json.loads(self.recovery.record(ROOM, payload, person.cid, target))
        assert sent["id"] == self.next_id
        assert not self.log or sent["seq"] == self.log[-1][0] + 1
        self.log.append((sent["seq"], person.cid, target, self.next_id))
        for other in self.people:
            if (other.state == "present" and other is not person
                    and (target is None or target == other.cid)):
                other.in_flight.append((sent["seq"], self.next_id))

    @rule(who=st.integers(0, PEOPLE - 1))
    def deliver(self, who: int) -> None:
        person = self.people[who]
        person.delivered += person.in_flight
        person.in_flight = []

    @rule(who=st.integers(0, PEOPLE - 1), clean=st.booleans(), lose=st.booleans())
    def drop(self, who: int, clean: bool, lose: bool) -> None:
        person = self.people[who]
        if person.state != "present":
            return
        if not lose:
            self.deliver(who)
        person.in_flight = []
        away = self.recovery.dropped(ROOM, person.cid, 1000 if clean else 1006)
        assert away is not clean
        if away:
            person.state, person.away_since = "away", self.clock.seconds()
        else:
            self._end(person)

    @precondition(lambda self: any(p.state == "away" for p in self.people))
    @rule(who=st.integers(0, PEOPLE - 1))
    def resume(self, who: int) -> None:
        """An away member comes back."""
        away = [p for p in self.people if p.state == "away"]
        self._resume(away[who % len(away)])

    @rule(who=st.integers(0, PEOPLE - 1))
    def takeover(self, who: int) -> None:
        """A member resumes before the relay noticed its old connection died."""
        if self.people[who].state == "present":
            self._resume(self.people[who])

    def _resume(self, person: Person) -> None:
        takeover = person.state == "present"
        person.in_flight = []  # on a takeover, what the old connection had is lost
        since = person.last_seq
        history = self.recovery.history.room(ROOM)
        history.trim(self.clock.seconds())  # what since() does first: age, count, bytes
        trimmed_past_since = history.trimmed_through > since
        outcome = self.recovery.resume(ROOM, person.fields["resumeToken"], since,
                                       person.fields["epoch"])
        self._sync_gone()
        if isinstance(outcome, Resumed):
            assert outcome.connection_id == person.cid and outcome.takeover is takeover
            assert person.cid not in self.ended
            replay = [(json.loads(f)["seq"], json.loads(f)["id"]) for f in outcome.frames]
            seqs = [seq for seq, _ in replay]
            assert seqs == sorted(set(seqs)) and all(seq > since for seq in seqs)
            person.delivered += replay
            assert person.delivered == self._owed(person)  # everything, once, in order
            person.fields = outcome.fields
            person.state = "present"
            self.resumed_ok += 1
            return
        assert isinstance(outcome, RecoveryFailure)
        if outcome is RecoveryFailure.HISTORY_TRIMMED:
            assert trimmed_past_since
        else:
            assert outcome is RecoveryFailure.SESSION_ENDED, outcome
            assert not takeover
            assert self.clock.seconds() - person.away_since >= WINDOW
        assert person.cid in self.gone  # ended at once, user-left said, old one closed
        self.ended.add(person.cid)
        self.stale.append((person.cid, person.fields))
        self._join(person)  # a fresh join: the app resyncs

    @precondition(lambda self: self.stale)
    @rule(which=st.integers(0, 100))
    def resume_an_ended_session(self, which: int) -> None:
        """A token of a member that left cleanly or whose window passed never works."""
        cid, fields = self.stale[which % len(self.stale)]
        outcome = self.recovery.resume(ROOM, fields["resumeToken"], fields["seq"],
                                       fields["epoch"])
        assert outcome in (RecoveryFailure.SESSION_ENDED, RecoveryFailure.TOKEN_REUSED)
        assert cid not in {p.cid for p in self.people if p.state != "left"}

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.999, 10.0, 12.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._sync_gone()

    @rule(who=st.integers(0, PEOPLE - 1))
    @precondition(lambda self: any(p.state == "left" for p in self.people))
    def rejoin(self, who: int) -> None:
        if self.people[who].state == "left":
            self._join(self.people[who])

    @invariant()
    def what_a_member_has_is_a_prefix_of_what_it_is_owed(self) -> None:
        for person in self.people:
            if person.state != "left":
                owed = self._owed(person)
                assert person.delivered == owed[:len(person.delivered)]

    @invariant()
    def gone_is_said_once_per_member_and_only_for_the_away(self) -> None:
        assert len(self.gone) == len(set(self.gone))
        present = {p.cid for p in self.people if p.state == "present"}
        assert not present & set(self.gone)


RecoveryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestRecoveryProperties = RecoveryMachine.TestCase


def test_the_machine_actually_resumes():
    """The property is not vacuous: a plain script through the machine resumes."""
    machine = RecoveryMachine()
    machine.send(0, None, 10)
    machine.drop(1, clean=False, lose=True)
    machine.send(0, 1, 10)
    machine.resume(0)
    assert machine.resumed_ok == 1
    assert [ident for _, ident in machine.people[1].delivered] == [1, 2]
