"""Where a recipient is, and the law of that place: the timezones of a phone number and the legal
calling hours that bound every message to it, whatever its priority or the user's own settings.

The number's region and timezones come from `phonenumbers` (the Python port of Google's
libphonenumber and its data). The rules are tables, each row citing its source; a profile
(COMPLIANCE_PROFILE) says which tables apply: `us` (the default) to numbers of the US and its
territories, `none` to nothing (the user's own quiet hours still hold).

Quiet hours and calling hours are checked in every timezone the user may be in: the user's own
when they set one; otherwise every zone the number maps to (an area code spanning two zones allows
only the hours allowed in both); a number that maps to no known zone gets all the zones of its
country, the most restrictive window, never UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import time
from functools import lru_cache

import phonenumbers
from phonenumbers import timezone as number_timezones

from shared.domain import CallingHours, UserSettings
from shared.policy.decision import CALLING_HOURS, STATE_CALLING_HOURS

PROFILES = ("us", "none")
# A user's timezone: set by them or an operator (`user`), derived from their number
# (`phone_number`), or not known (`default`: the column's placeholder until it is derived).
TIMEZONE_SOURCES = ("user", "phone_number", "default")


# The US and the territories where the TCPA applies (regions of country code 1).
US_REGIONS = frozenset({"US", "PR", "VI", "GU", "AS", "MP"})


@dataclass(frozen=True)
class StateRule:
    """A state's stricter rule: its calling hours and at most `topic_limit` messages on one subject
    (topicKey) per rolling 24 h."""

    state: str
    start: time
    end: time
    topic_limit: int
    source: str


# 47 CFR 64.1200(c)(1): no telephone solicitation before 8 am or after 9 pm at the called party's
# location (the FCC treats texts as calls). https://www.ecfr.gov/current/title-47/section-64.1200
FEDERAL = CallingHours(start=time(8), end=time(21), reason=CALLING_HOURS, zones=())
FEDERAL_SOURCE = "47 CFR 64.1200(c)(1) (TCPA): 8 am to 9 pm, the called party's local time"

STATE_RULES: dict[str, StateRule] = {
    rule.state: rule
    for rule in (
        StateRule(
            "FL", time(8), time(20), 3,
            "Fla. Stat. 501.059(8)(a) (Florida Telephone Solicitation Act, as amended 2021 and 2023): "
            "8 am to 8 pm, at most 3 per 24 h on the same subject",
        ),
        StateRule(
            "OK", time(8), time(20), 3,
            "Okla. Stat. tit. 15, 775C.4 (Oklahoma Telephone Solicitation Act of 2022): 8 am to 8 pm, "
            "at most 3 per 24 h on the same subject",
        ),
        StateRule(
            "MD", time(8), time(20), 3,
            "Md. Code, Com. Law 14-4503 (Stop the Spam Calls Act of 2023): 8 am to 8 pm, at most 3 per "
            "24 h on the same subject",
        ),
    )
}  # fmt: skip

# The area codes of those states, from NANPA's assignments (https://nanpa.com, "Area Code Map").
# Kept here rather than read through phonenumbers' geocoder, which costs half a second and tens of
# MB at every cold start; tests/unit/test_compliance.py checks this table against the geocoder's data.
STATE_AREA_CODES: dict[str, frozenset[str]] = {
    "FL": frozenset({"239", "305", "321", "324", "352", "386", "407", "448", "561", "645", "656", "689",
                     "727", "728", "754", "772", "786", "813", "850", "863", "904", "941", "954"}),
    "OK": frozenset({"405", "539", "572", "580", "918"}),
    "MD": frozenset({"227", "240", "301", "410", "443", "667"}),
}  # fmt: skip
_STATE_OF_AREA = {code: state for state, codes in STATE_AREA_CODES.items() for code in codes}


@dataclass(frozen=True)
class Place:
    """What a phone number says of where its owner is."""

    region: str | None  # ISO 3166 code (phonenumbers' region), None if the number is not valid
    state: str | None  # a US state with a stricter rule, if the number's area code is one of its
    zones: tuple[str, ...]  # the IANA zones the number may be in (empty: not even the country's)


@lru_cache(maxsize=4096)
def place_of(phone_number: str) -> Place:
    try:
        number = phonenumbers.parse(phone_number, None)
    except phonenumbers.NumberParseException:
        return Place(None, None, ())
    region = phonenumbers.region_code_for_number(number) if phonenumbers.is_valid_number(number) else None
    zones = tuple(z for z in number_timezones.time_zones_for_number(number) if z != "Etc/Unknown")
    if not zones:
        zones = _country_zones(number.country_code)
    state = None
    if number.country_code == 1 and (region in US_REGIONS or region is None):
        state = _STATE_OF_AREA.get(str(number.national_number)[:3])
    return Place(region, state, zones)


@lru_cache(maxsize=64)
def _country_zones(country_code: int) -> tuple[str, ...]:
    """Every zone of the main region of a country code, the most restrictive set when the number's
    own is unknown (for +1: the mainland US, Alaska and Hawaii, not every NANP island)."""
    region = phonenumbers.region_code_for_country_code(country_code)
    example = phonenumbers.example_number(region) if region != "ZZ" else None
    if region == "US":
        return _US_ZONES
    if example is None:
        return ()
    zones = number_timezones.time_zones_for_geographical_number(example)
    return tuple(z for z in zones if z != "Etc/Unknown")


_US_ZONES = (
    "America/New_York", "America/Chicago", "America/Denver", "America/Phoenix", "America/Los_Angeles",
    "America/Anchorage", "Pacific/Honolulu",
)  # fmt: skip


def timezone_for(phone_number: str) -> str | None:
    """The zone to store for a user whose timezone is not known: the number's, if it has exactly one."""
    zones = place_of(phone_number).zones
    return zones[0] if len(zones) == 1 else None


def recipient(
    user: UserSettings, phone_number: str, profile: str, *, transactional: bool = False
) -> UserSettings:
    """The user's settings with where they are and the law there: the zones quiet hours hold in,
    and the calling hours (none for a `transactional` message of an allowed agent)."""
    place = place_of(phone_number)
    if user.timezone_source == "user":
        zones: tuple[str, ...] = (user.timezone,)
    else:
        zones = place.zones or (user.timezone,)
    hours: tuple[CallingHours, ...] = ()
    topic_limit = None
    if profile == "us" and not transactional and _in_us(place):
        hours = (CallingHours(FEDERAL.start, FEDERAL.end, CALLING_HOURS, zones),)
        rule = STATE_RULES.get(place.state or "")
        if rule is not None:
            hours += (CallingHours(rule.start, rule.end, STATE_CALLING_HOURS, zones),)
            topic_limit = rule.topic_limit
    located = user.located(zones=zones, calling_hours=hours, topic_limit=topic_limit)
    # The user's day (budgets) runs in the first zone when the number, not the user, says where.
    return located if zones[0] == user.timezone else replace(located, timezone=zones[0])


def _in_us(place: Place) -> bool:
    """A valid number of the US or its territories (one that is not valid cannot receive an SMS:
    555-01xx and the like are fictional)."""
    return place.region in US_REGIONS
