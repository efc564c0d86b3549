"""The ISA-18.2 state machine of one alarm: pure, deterministic, no clock and no I/O.

`Alarm(spec, state)` answers a reading, the passing of time (`tick`) and each operator action
with a `Step`: the new state and the transitions, one per change of the alarm's state. Times are
epoch seconds given by the caller; they never run backwards (an earlier time counts as the
latest seen), so replaying the same inputs gives the same transitions.

The alarm's state is derived, never stored twice: out of service, else shelved, else from
whether the condition is `active` (after the on/off delays) and whether it is `acked`:

    active, not acked: unacknowledged    active, acked: acknowledged
    clear, not acked:  returned_unacknowledged    clear, acked: normal

Semantics (docs/design.md, "Alarms"):
- the raw condition of an analog limit holds from `value >= hi` (`<= lo`) and, once held, until
  `value < hi - deadband` (`> lo + deadband`): no chatter inside the deadband. It becomes active
  when it has held for `on_delay_s` without a break, and clear when it has been gone for
  `off_delay_s`. A value holds until the next reading (report by exception), so the moment of
  the change is `raw_since + delay`, whichever call finds it;
- HIHI and HI are separate alarms: above HIHI both are active (no suppression);
- a reading without a value (BAD, or value None) neither raises nor clears a limit or a
  discrete alarm: the alarm keeps its state and any pending delay is cancelled. UNCERTAIN
  readings carry their last known value and are judged by it;
- COMMS: the condition holds on a BAD `comm_failure` reading, and goes on the next reading
  that is not `comm_failure` (an UNCERTAIN `comm_failure` changes nothing). No delays;
- shelved: the condition is still followed but raises nothing; when the shelve ends (expiry or
  unshelve) the alarm is unacknowledged if its condition is active, else normal;
- out of service: readings and actions are ignored; back in service the alarm starts normal and
  the next reading judges it afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.alarms.limits import AlarmSpec, Priority
from app.models import Quality, Reason

StateName = Literal["normal", "unacknowledged", "acknowledged", "returned_unacknowledged", "shelved", "out_of_service"]
Cause = Literal[
    "activated",
    "cleared",
    "acknowledged",
    "shelved",
    "unshelved",
    "shelve_expired",
    "removed_from_service",
    "returned_to_service",
]


class AlarmState(BaseModel):
    """What one alarm remembers between calls; JSON-compatible (`to_dict`/`from_dict`) for the engine to store.

    `raw` is the condition of the latest reading (deadband applied) and `raw_since` when it last
    changed; `active` is the condition after the delays. `value` is the latest known value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    active: bool = False
    raw: bool = False
    raw_since: float = 0.0
    acked: bool = True
    shelved_until: float | None = None
    out_of_service: bool = False
    value: float | None = None
    at: float = 0.0

    @property
    def name(self) -> StateName:
        if self.out_of_service:
            return "out_of_service"
        if self.shelved_until is not None:
            return "shelved"
        if self.active:
            return "acknowledged" if self.acked else "unacknowledged"
        return "normal" if self.acked else "returned_unacknowledged"

    def to_dict(self) -> dict[str, object]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: object) -> AlarmState:
        return cls.model_validate(data)


class Transition(BaseModel):
    """One change of an alarm's state: an event. `by` and `comment` are set when an operator acted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_state: StateName
    to_state: StateName
    at: float
    cause: Cause
    value: float | None
    limit: float | None
    priority: Priority
    by: str | None = None
    comment: str | None = None
    until: float | None = None  # a shelve's expiry


@dataclass(frozen=True, slots=True)
class Step:
    state: AlarmState
    transitions: tuple[Transition, ...] = ()


@dataclass(frozen=True, slots=True)
class _Action:
    cause: Cause
    by: str | None = None
    comment: str | None = None
    until: float | None = None


_NEW = AlarmState()
_Change = Callable[[AlarmState], dict[str, object] | None]  # the fields an action changes; None: not now


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm: its spec (from the site file) and its state. Every method returns a `Step`; nothing mutates."""

    spec: AlarmSpec
    state: AlarmState = _NEW

    def on_reading(self, value: float | None, quality: Quality, reason: Reason | None, at: float) -> Step:
        """Judge one reading of the alarm's tag (its time `at`), after letting time run up to `at`."""
        step = self.tick(at)
        state = step.state
        if state.out_of_service:
            return step
        known = value if quality != "BAD" and value is not None and math.isfinite(value) else None
        raw = self._condition(state, known, quality, reason)
        updates: dict[str, object] = {"value": state.value if known is None else known}
        if raw is None:  # the reading cannot tell: hold the alarm as it is, cancel a pending delay
            updates |= {"raw": state.active, "raw_since": state.at}
        elif raw != state.raw:
            updates |= {"raw": raw, "raw_since": state.at}
        now = Alarm(self.spec, state.model_copy(update=updates)).tick(state.at)  # a change without delay is now
        return Step(now.state, step.transitions + now.transitions)

    def tick(self, at: float) -> Step:
        """Let time run to `at`: delays that end and a shelve that expires, in the order they happen."""
        state = self.state
        at = max(at, state.at)
        transitions: list[Transition] = []
        while not state.out_of_service and (due := self._next_due(state)) is not None and due[0] <= at:
            moment, expiry = max(due[0], state.at), due[1]
            if expiry:
                after = state.model_copy(update={"shelved_until": None, "acked": not state.active, "at": moment})
                action = _Action("shelve_expired")
            else:  # a new activation needs an acknowledgement; a clear keeps the one it had
                update = {"active": state.raw, "acked": state.acked and not state.raw, "at": moment}
                after = state.model_copy(update=update)
                action = _Action("activated" if state.raw else "cleared")
            transitions += self._transition(state, after, action)
            state = after
        return Step(state.model_copy(update={"at": at}), tuple(transitions))

    def acknowledge(self, by: str, at: float, comment: str | None = None) -> Step:
        """Unacknowledged -> acknowledged; returned unacknowledged -> normal; otherwise nothing (idempotent)."""
        return self._act(at, _Action("acknowledged", by, comment), _acknowledge)

    def shelve(self, by: str, until: float, at: float, comment: str | None = None) -> Step:
        """Shelve until `until` (after `at`); shelving again moves the expiry. Ignored out of service."""
        if not until > at:
            raise ValueError(f"a shelve must end after it starts ({until:g} <= {at:g})")

        def change(state: AlarmState) -> dict[str, object] | None:
            return None if state.out_of_service else {"shelved_until": until}

        return self._act(at, _Action("shelved", by, comment, until), change)

    def unshelve(self, by: str, at: float, comment: str | None = None) -> Step:
        """End a shelve now: unacknowledged if the condition is active, else normal."""
        return self._act(at, _Action("unshelved", by, comment), _unshelve)

    def remove_from_service(self, by: str, at: float, comment: str | None = None) -> Step:
        """Out of service (ending any shelve) until returned: readings and actions are ignored."""
        return self._act(at, _Action("removed_from_service", by, comment), _remove)

    def return_to_service(self, by: str, at: float, comment: str | None = None) -> Step:
        """Back in service as normal: what the alarm saw before is stale, the next reading judges it afresh."""
        return self._act(at, _Action("returned_to_service", by, comment), _restore)

    def _act(self, at: float, action: _Action, change: _Change) -> Step:
        step = self.tick(at)
        updates = change(step.state)
        if updates is None:
            return step
        after = step.state.model_copy(update=updates)
        return Step(after, step.transitions + tuple(self._transition(step.state, after, action, always=True)))

    def _condition(
        self, state: AlarmState, value: float | None, quality: Quality, reason: Reason | None
    ) -> bool | None:
        """The raw condition of this reading; None when the reading cannot tell."""
        spec = self.spec
        if spec.kind == "COMMS":
            if reason == "comm_failure":
                return True if quality == "BAD" else None
            return False
        if value is None or spec.setpoint is None:
            return None
        if spec.high:  # once held, held until the value is past the deadband
            return value >= (spec.setpoint - spec.deadband if state.raw else spec.setpoint)
        if spec.low:
            return value <= (spec.setpoint + spec.deadband if state.raw else spec.setpoint)
        return math.isclose(value, spec.setpoint, rel_tol=1e-9, abs_tol=1e-9)

    def _next_due(self, state: AlarmState) -> tuple[float, bool] | None:
        """The earliest pending change: (when, True) for a shelve's expiry, (when, False) for a delay's end."""
        candidates = []
        if state.shelved_until is not None:
            candidates.append((state.shelved_until, True))
        if state.raw != state.active:
            delay = self.spec.on_delay_s if state.raw else self.spec.off_delay_s
            candidates.append((state.raw_since + delay, False))
        return min(candidates) if candidates else None

    def _transition(
        self, before: AlarmState, after: AlarmState, action: _Action, always: bool = False
    ) -> list[Transition]:
        """The transition from `before` to `after`, if the state changed (or an operator acted: `always`)."""
        if before.name == after.name and not always:
            return []
        return [
            Transition(
                from_state=before.name,
                to_state=after.name,
                at=after.at,
                cause=action.cause,
                value=before.value,
                limit=self.spec.setpoint,
                priority=self.spec.priority,
                by=action.by,
                comment=action.comment,
                until=action.until,
            )
        ]


def _acknowledge(state: AlarmState) -> dict[str, object] | None:
    return {"acked": True} if state.name in ("unacknowledged", "returned_unacknowledged") else None


def _unshelve(state: AlarmState) -> dict[str, object] | None:
    return {"shelved_until": None, "acked": not state.active} if state.name == "shelved" else None


def _remove(state: AlarmState) -> dict[str, object] | None:
    return None if state.out_of_service else {"out_of_service": True, "shelved_until": None}


def _restore(state: AlarmState) -> dict[str, object] | None:
    if not state.out_of_service:
        return None
    return {"out_of_service": False, "active": False, "raw": False, "raw_since": state.at, "acked": True, "value": None}
