"""shared.compliance: a number's place from phonenumbers' data, and the legal floor the planner
keeps (a hypothesis property: no plan ever falls outside the calling hours in any of the zones)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import geocoder

from shared import compliance
from shared.domain import History, Limits, UserSettings
from shared.policy import plan

STATE_NAMES = {"FL": "Florida", "OK": "Oklahoma", "MD": "Maryland"}


def test_the_area_code_table_is_what_libphonenumbers_geocoder_says() -> None:
    """The table stands in for the geocoder (too costly at cold start): every area code of the
    three states per the geocoder's data is in it, and nothing else."""
    found: dict[str, set[str]] = {state: set() for state in STATE_NAMES}
    for area in range(200, 1000):
        number = phonenumbers.parse(f"+1{area}5550123")
        if not phonenumbers.is_valid_number(number):
            continue
        where = geocoder.description_for_number(number, "en")
        for state, name in STATE_NAMES.items():
            if where == name or where.endswith(f", {state}"):
                found[state].add(str(area))
    assert found == {state: set(codes) for state, codes in compliance.STATE_AREA_CODES.items()}


@pytest.mark.parametrize(
    ("phone", "region", "state", "zones"),
    [
        ("+14155550123", "US", None, ("America/Los_Angeles",)),
        ("+13055550123", "US", "FL", ("America/New_York",)),
        ("+19185550123", "US", "OK", ("America/Chicago",)),
        ("+14105550123", "US", "MD", ("America/New_York",)),
        ("+19075550123", "US", None, ("America/Adak", "America/Anchorage")),
        ("+17875550123", "PR", None, ("America/Puerto_Rico",)),
        (
            "+447911123456",
            "GG",
            None,
            ("Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey", "Europe/London"),
        ),
        ("+15550000123", None, None, compliance._US_ZONES),  # fictional: every US zone
        ("not a number", None, None, ()),
    ],
)
def test_the_place_of_a_number(
    phone: str, region: str | None, state: str | None, zones: tuple[str, ...]
) -> None:
    assert compliance.place_of(phone) == compliance.Place(region, state, zones)


def test_the_timezone_stored_for_a_number_is_its_only_zone() -> None:
    assert compliance.timezone_for("+14155550123") == "America/Los_Angeles"
    assert compliance.timezone_for("+19075550123") is None  # two zones: planned in both, not stored
    assert compliance.timezone_for("+15550000123") is None


def test_recipient_settings() -> None:
    base = UserSettings(timezone="UTC", timezone_source="default")
    sf = compliance.recipient(base, "+14155550123", "us")
    assert sf.timezone == "America/Los_Angeles" and sf.zones == ("America/Los_Angeles",)
    assert [(h.start, h.end, h.reason) for h in sf.calling_hours] == [(time(8), time(21), "calling_hours")]
    fl = compliance.recipient(
        replace(base, timezone="America/New_York", timezone_source="user"), "+13055550123", "us"
    )
    assert [h.reason for h in fl.calling_hours] == [
        "calling_hours",
        "state_calling_hours",
    ] and fl.topic_limit == 3
    assert compliance.recipient(base, "+14155550123", "none").calling_hours == ()
    assert compliance.recipient(base, "+14155550123", "us", transactional=True).calling_hours == ()
    assert compliance.recipient(base, "+447911123456", "us").calling_hours == ()  # not a US number


US = ("America/New_York", "America/Chicago", "America/Denver", "America/Phoenix", "America/Los_Angeles",
      "America/Anchorage", "America/Adak", "Pacific/Honolulu", "America/Puerto_Rico")  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    zones=st.lists(st.sampled_from(US), min_size=1, max_size=3, unique=True),
    state=st.booleans(),
    now=st.integers(0, 3 * 365 * 86400),
    priority=st.sampled_from(["urgent", "high", "medium", "low"]),
    skips=st.booleans(),
    quiet=st.booleans(),
    active=st.none() | st.integers(0, 1200),
    span=st.sampled_from([0, 0, 30, 300]),
    sends=st.lists(st.integers(0, 30 * 3600), max_size=6),
)
def test_no_plan_ever_falls_outside_the_legal_floor(
    zones: list[str], state: bool, now: int, priority: str, skips: bool, quiet: bool,
    active: int | None, span: int, sends: list[int],
) -> None:  # fmt: skip
    start = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=now)
    hours = [compliance.FEDERAL] + (
        [compliance.CallingHours(time(8), time(20), "state_calling_hours", ())] if state else []
    )
    user = UserSettings(
        timezone=zones[0],
        zones=tuple(zones),
        quiet_hours_enabled=quiet,
        calling_hours=tuple(replace(h, zones=tuple(zones)) for h in hours),
    )
    history = History(
        sends=sorted(start - timedelta(seconds=s) for s in sends),
        last_inbound_at=None if active is None else start - timedelta(seconds=active),
    )
    d = plan(user, Limits(), history, start, priority, span=timedelta(seconds=span), urgent_skips_quiet=skips)
    if d.at is None:
        return
    for moment in (d.at, d.at + timedelta(seconds=span)):
        for z in zones:
            local = moment.astimezone(ZoneInfo(z)).time()
            for h in hours:
                assert h.start <= local < h.end, (z, moment, h.reason, d)
