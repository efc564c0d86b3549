"""A tag's alarms as the site file writes them, and what each alarm is called.

A point's `alarms` table sets analog limits (`hihi`, `hi`, `lo`, `lolo`: each a number or a
table with its own priority, deadband and delays), or discrete alarms on a state value, and
whether the tag raises a COMMS alarm when its device is lost (a BAD `comm_failure` reading).
`TagAlarms.specs()` turns that into one `AlarmSpec` per alarm: what app/alarms/machine.py runs.

Priorities are words, "critical" > "high" > "medium" > "low" (ISA-18.2 suggests three or four
levels; words read the same in the file, the events and on screen, and never invert the way
"1 is highest" numbers do). `PRIORITY_RANK` orders them for sorting.

An alarm is (tenant, well, tag, kind); `alarm_id` names it within its tenant, for URLs.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.models import is_valid_id

Priority = Literal["critical", "high", "medium", "low"]
PRIORITY_RANK: dict[Priority, int] = {"critical": 4, "high": 3, "medium": 2, "low": 1}
LimitKind = Literal["HIHI", "HI", "LO", "LOLO"]
# The analog limits from the lowest to the highest, as the file names them.
_ORDER: tuple[Literal["lolo", "lo", "hi", "hihi"], ...] = ("lolo", "lo", "hi", "hihi")
_DEFAULT_PRIORITY: dict[str, Priority] = {"hihi": "high", "lolo": "high", "hi": "medium", "lo": "medium"}
DISCRETE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$"  # no dot: see alarm_id

Seconds = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Limit(BaseModel):
    """One analog limit: its value in the tag's engineering unit and, when set, what overrides the tag's defaults.

    In the file a bare number (`hi = 120`) is a limit with the default priority.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float = Field(allow_inf_nan=False)
    priority: Priority | None = None
    deadband: Amount | None = None
    on_delay_s: Seconds | None = None
    off_delay_s: Seconds | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_number_is_a_value(cls, data: Any) -> Any:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return {"value": data}
        return data


class Discrete(BaseModel):
    """An alarm while a state tag (0/1, or a multistate number) has `value`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=DISCRETE_NAME_PATTERN)
    value: float = Field(allow_inf_nan=False)
    priority: Priority = "medium"
    on_delay_s: Seconds | None = None
    off_delay_s: Seconds | None = None


@dataclass(frozen=True, slots=True)
class AlarmSpec:
    """One alarm of a tag, resolved: what the state machine needs and nothing else.

    `kind` is HIHI, HI, LO, LOLO, COMMS or DISCRETE:<name>. `setpoint` is the limit (analog),
    the state value (discrete), or None (COMMS). `deadband` applies to analog limits only.
    """

    kind: str
    priority: Priority
    setpoint: float | None = None
    deadband: float = 0.0
    on_delay_s: float = 0.0
    off_delay_s: float = 0.0

    @property
    def high(self) -> bool:
        return self.kind in ("HI", "HIHI")

    @property
    def low(self) -> bool:
        return self.kind in ("LO", "LOLO")


class TagAlarms(BaseModel):
    """The `alarms` of one point: analog limits or discrete states, and the COMMS alarm.

    `deadband` (engineering units), `on_delay_s` and `off_delay_s` are the defaults of every
    limit; a limit (or a discrete alarm, for the delays) may set its own. `comms`: true raises a
    "high" COMMS alarm on a BAD `comm_failure` reading, a priority raises it at that priority,
    false raises none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hihi: Limit | None = None
    hi: Limit | None = None
    lo: Limit | None = None
    lolo: Limit | None = None
    deadband: Amount = 0.0
    on_delay_s: Seconds = 0.0
    off_delay_s: Seconds = 0.0
    discrete: list[Discrete] = Field(default_factory=list)
    comms: bool | Priority = True

    @field_validator("comms", mode="before")
    @classmethod
    def _comms(cls, value: object) -> object:
        if not isinstance(value, bool) and value not in PRIORITY_RANK:
            raise ValueError("comms is true, false or a priority: critical, high, medium or low")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = [*self._ordering_problems(), *self._deadband_problems(), *self._discrete_problems()]
        if problems:
            raise ValueError("\n".join(problems))  # one line each (app/ingest/sitefile.py)
        return self

    def _limits(self) -> list[tuple[str, Limit]]:
        """The limits that are set, from the lowest (lolo) to the highest (hihi)."""
        return [(name, limit) for name in _ORDER if (limit := getattr(self, name)) is not None]

    def _ordering_problems(self) -> list[str]:
        limits = self._limits()
        problems = []
        for (low_name, low), (high_name, high) in itertools.pairwise(limits):
            if low.value >= high.value:
                relation = "equal to" if low.value == high.value else "above"
                order = "limits rise lolo < lo < hi < hihi"
                problems.append(f"{low_name} {low.value:g} is {relation} {high_name} {high.value:g}: {order}")
        return problems

    def _deadband_problems(self) -> list[str]:
        """Each deadband reaches from its limit towards normal: lo and lolo's upwards, hi and hihi's downwards.

        Those reaching into the gap between two adjacent limits must fit in it, or one alarm could
        not clear before the next one's condition holds.
        """
        limits = self._limits()
        problems = []
        for (low_name, low), (high_name, high) in itertools.pairwise(limits):
            gap = high.value - low.value
            if gap <= 0:
                continue  # already an ordering problem
            # the lower limit's deadband reaches up into the gap if it is a low limit, the upper's down if high
            reaching = [(n, self._deadband(lim)) for n, lim in ((low_name, low), (high_name, high))]
            reaching = [(n, d) for n, d in reaching if d > 0 and (n in ("lo", "lolo")) == (n == low_name)]
            if sum(d for _, d in reaching) >= gap:
                names = " and ".join(f"{n} ({d:g})" for n, d in reaching)
                noun = "deadbands" if len(reaching) > 1 else "deadband"
                problems.append(
                    f"the {noun} of {names} must be smaller than the gap between {low_name} {low.value:g}"
                    f" and {high_name} {high.value:g} ({gap:g})"
                )
        return problems

    def _discrete_problems(self) -> list[str]:
        problems = []
        if self.discrete and self._limits():
            problems.append("discrete alarms are for a tag whose value is a state: not with hihi, hi, lo or lolo")
        names = [d.name for d in self.discrete]
        values = [d.value for d in self.discrete]
        if dup_names := sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"discrete alarm names must be unique: {', '.join(dup_names)}")
        if dup_values := sorted({v for v in values if values.count(v) > 1}):
            problems.append(f"discrete alarm values must be unique: {', '.join(f'{v:g}' for v in dup_values)}")
        return problems

    def _deadband(self, limit: Limit) -> float:
        return self.deadband if limit.deadband is None else limit.deadband

    def specs(self) -> list[AlarmSpec]:
        """One spec per alarm of the tag: the limits from the highest down, the discrete alarms, then COMMS."""
        specs = [self._limit_spec(name, limit) for name, limit in reversed(self._limits())]
        specs += [
            AlarmSpec(
                kind=f"DISCRETE:{d.name}",
                priority=d.priority,
                setpoint=d.value,
                on_delay_s=self.on_delay_s if d.on_delay_s is None else d.on_delay_s,
                off_delay_s=self.off_delay_s if d.off_delay_s is None else d.off_delay_s,
            )
            for d in self.discrete
        ]
        if self.comms is not False:
            specs.append(AlarmSpec(kind="COMMS", priority="high" if self.comms is True else self.comms))
        return specs

    def _limit_spec(self, name: str, limit: Limit) -> AlarmSpec:
        return AlarmSpec(
            kind=name.upper(),
            priority=_DEFAULT_PRIORITY[name] if limit.priority is None else limit.priority,
            setpoint=limit.value,
            deadband=self._deadband(limit),
            on_delay_s=self.on_delay_s if limit.on_delay_s is None else limit.on_delay_s,
            off_delay_s=self.off_delay_s if limit.off_delay_s is None else limit.off_delay_s,
        )


def _kind_token(kind: str) -> str:
    """The kind as it appears in an id: `DISCRETE:<name>` becomes `DISCRETE-<name>` (a colon is not allowed)."""
    return kind.replace(":", "-", 1)


def alarm_id(well: str, tag: str, kind: str) -> str:
    """The alarm's id within its tenant: `<well>.<tag>.<kind>`, e.g. `well-01.tubing_pressure.HIHI`.

    Well and tag ids may themselves hold dots, and the three together may pass 64 characters;
    then the readable form would be ambiguous (`a.b`/`c` and `a`/`b.c`) or too long, so the id
    is `<kind>-<first 20 hex digits of SHA-256 of well, tag and kind>` instead. A readable id has
    exactly two dots, a hashed one none, so the two forms never meet. Every id matches the
    project's id pattern (app/models.py), so it is safe in URLs and Redis keys.
    """
    token = _kind_token(kind)
    readable = f"{well}.{tag}.{token}"
    if "." not in well and "." not in tag and is_valid_id(readable):
        return readable
    digest = hashlib.sha256(f"{well}\n{tag}\n{kind}".encode()).hexdigest()[:20]
    return f"{token}-{digest}"


@dataclass(frozen=True, slots=True, order=True)
class AlarmKey:
    """Who an alarm is: one kind of alarm on one tag of one well of one tenant."""

    tenant: str
    well: str
    tag: str
    kind: str

    @property
    def id(self) -> str:
        return alarm_id(self.well, self.tag, self.kind)
