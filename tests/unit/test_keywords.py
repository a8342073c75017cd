"""What a user's reply means for consent (shared/twilio_forms.py): the normaliser, every keyword of
Twilio's defaults and the FCC's 2024 order, the revocation phrases, and the near-misses that are
conversation, not an opt-out."""

from __future__ import annotations

import pytest

from shared.twilio_forms import (
    HELP_WORDS,
    KEYWORD,
    PHRASE,
    START_WORDS,
    STOP_PHRASES,
    STOP_WORDS,
    Reply,
    keyword,
    normalise,
    reply_keyword,
)


@pytest.mark.parametrize(
    ("body", "normalised"),
    [
        ("stop", "STOP"),
        ("  Stop  ", "STOP"),
        ("Stop!", "STOP"),
        (" stop. ", "STOP"),
        ("(stop)", "STOP"),
        ("¡¿stop?!", "STOP"),
        ('"STOP"', "STOP"),
        ("\tstop\n", "STOP"),
        ("stop   all", "STOP ALL"),
        ("opt\u00a0out", "OPT OUT"),  # a no-break space is whitespace too
        ("ＳＴＯＰ", "STOP"),  # full-width letters, as some keyboards type them
        ("don\u2019t text me", "DON'T TEXT ME"),  # a typographic apostrophe
        ("don\u2018t", "DON'T"),
        ("...", ""),
        ("", ""),
        (None, ""),
        ("stop, please", "STOP, PLEASE"),  # punctuation inside is kept
        ("opt-out", "OPT-OUT"),
    ],
)
def test_the_normaliser(body: str | None, normalised: str) -> None:
    assert normalise(body) == normalised


# Every keyword, as sources list them (Twilio's defaults; 47 CFR 64.1200(a)(10)), in several forms.
KEYWORDS = [
    *[
        (word, "stop")
        for word in ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT")
    ],
    ("OPT OUT", "stop"),
    ("STOP ALL", "stop"),
    *[(word, "start") for word in ("START", "UNSTOP", "YES")],
    *[(word, "help") for word in ("HELP", "INFO")],
]


def test_the_keyword_sets_are_exactly_the_sources_lists() -> None:
    assert {w for w, k in KEYWORDS if k == "stop"} == STOP_WORDS
    assert {w for w, k in KEYWORDS if k == "start"} == START_WORDS
    assert {w for w, k in KEYWORDS if k == "help"} == HELP_WORDS


@pytest.mark.parametrize(("word", "meaning"), KEYWORDS)
@pytest.mark.parametrize(
    "form", ["{}", "{lower}", "{title}", "  {lower}  ", "{title}!", " {lower}. ", "{lower}?!"]
)
def test_every_keyword_in_any_case_with_surrounding_punctuation(word: str, meaning: str, form: str) -> None:
    body = form.format(word, lower=word.lower(), title=word.title())
    assert reply_keyword(body) == Reply(meaning, KEYWORD)
    assert keyword(body) == meaning


def test_two_word_keywords_with_extra_inner_whitespace() -> None:
    assert reply_keyword("opt    out") == Reply("stop", KEYWORD)
    assert reply_keyword("Stop \t All") == Reply("stop", KEYWORD)


def test_consent_events_by_keyword() -> None:
    assert Reply("stop", KEYWORD).event == "opt_out"
    assert Reply("start", PHRASE).event == "opt_in"
    assert Reply("help", KEYWORD).event == "help"


PHRASES = [
    "stop texting me",
    "Stop texting me!",
    "stop messaging me",
    "STOP MESSAGING ME.",
    "unsubscribe me",
    "Unsubscribe me please",
    "don't text me",
    "Don\u2019t text me",  # the apostrophe phones insert
    "dont text me",
    "do not text me",
    "Do not text me!!",
    "remove me from this list",
    "Remove me from this list, please.",
    "please remove me from your list",
    "take me off your list",
    "stop texting me please",
    "stop texting me, please",
    "Please stop texting me",
    "please, stop messaging me!",
    "stop please",
    "please stop",
    "Stop, please!",
    "opt-out",  # Twilio's filter misses the hyphen; the FCC's "opt out" does not
    "Opt-Out please",
    "no more texts",
    "I want to opt out",
    "stop sending me messages",
    "do not contact me",
]


@pytest.mark.parametrize("body", PHRASES)
def test_revocation_phrases_opt_out_as_phrases(body: str) -> None:
    assert reply_keyword(body) == Reply("stop", PHRASE)
    assert keyword(body) == "stop"


def test_every_listed_phrase_opts_out() -> None:
    for phrase in STOP_PHRASES:
        found = reply_keyword(phrase.lower())
        assert found is not None and found.keyword == "stop", phrase


NEAR_MISSES = [
    "stop by tomorrow",
    "don't stop",
    "do not stop",
    "can you stop by at 5?",
    "stop texting me so late",  # a complaint about timing; the agent answers it
    "I'll stop texting you",
    "unsubscribe from what?",
    "how do I unsubscribe",
    "cancel my appointment",
    "cancel please",  # an appointment, most likely
    "the end",
    "yes please",
    "yes!!! book it",
    "help me choose",
    "start the trip",
    "stop stop",
    "S T O P",
    "stopp",
    "please",
    "",
    "   ",
    "!!!",
    "🛑",
    "remove me from the group chat",
    "don't text me before 9",
]


@pytest.mark.parametrize("body", NEAR_MISSES)
def test_near_misses_are_conversation_not_consent(body: str) -> None:
    assert reply_keyword(body) is None
    assert keyword(body) is None
