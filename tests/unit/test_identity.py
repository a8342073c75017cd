"""Who the caller is, by CALLER_IDENTITY mode, and which agents it may act as (pure: no request)."""

from __future__ import annotations

import base64
import json

import pytest

from shared.errors import ForbiddenAgent, Unauthenticated
from shared.identity import ANYONE, IDENTITY_HEADER, Caller, caller, parse_identities

IDENTITIES = parse_identities(json.dumps({"a@x.test": ["agent_a", "agent_b"], "ops@x.test": ["*"]}))


def headers(**values: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in values.items()}


def jwt(claims: dict[str, object], signature: str | None = "c2ln") -> str:
    def seg(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return ".".join([seg({"alg": "RS256"}), seg(claims), *([signature] if signature else [])])


def test_none_mode_is_anyone_acting_as_any_agent() -> None:
    assert caller({}.get, "none", IDENTITIES) is ANYONE
    assert ANYONE.may_act_as("whoever") and ANYONE.may_act_as(None)


def test_header_mode_maps_the_identity_to_its_agents() -> None:
    who = caller({IDENTITY_HEADER: " A@X.test "}.get, "header", IDENTITIES)
    assert who == Caller(identity="a@x.test", agent_ids=frozenset({"agent_a", "agent_b"}))
    assert who.may_act_as("agent_b") and not who.may_act_as("agent_c") and not who.may_act_as(None)
    with pytest.raises(ForbiddenAgent, match=r"a@x\.test may not act as agent 'agent_c'") as refused:
        who.require("agent_c", messageId="m")
    assert refused.value.to_dict() | {"message": ""} == {
        "success": False, "error": "forbidden_agent", "message": "", "agentId": "agent_c", "messageId": "m",
    }  # fmt: skip


def test_an_operator_may_act_as_every_agent_and_a_stranger_as_none() -> None:
    assert caller({IDENTITY_HEADER: "ops@x.test"}.get, "header", IDENTITIES).agent_ids is None
    stranger = caller({IDENTITY_HEADER: "who@x.test"}.get, "header", IDENTITIES)
    assert stranger.agent_ids == frozenset() and not stranger.may_act_as("agent_a")


@pytest.mark.parametrize("sent", [{}, {IDENTITY_HEADER: "  "}])
def test_header_mode_without_the_header_is_unauthenticated(sent: dict[str, str]) -> None:
    with pytest.raises(Unauthenticated):
        caller(sent.get, "header", IDENTITIES)


@pytest.mark.parametrize("signature", ["c2ln", None], ids=["signed", "stripped"])
def test_id_token_mode_reads_the_email_claim(signature: str | None) -> None:
    token = jwt({"email": "a@x.test", "email_verified": True}, signature)
    who = caller({"Authorization": f"Bearer {token}"}.get, "id_token", IDENTITIES)
    assert who.identity == "a@x.test" and who.may_act_as("agent_a")


def test_the_serverless_authorization_header_wins() -> None:
    sent = {
        "X-Serverless-Authorization": f"Bearer {jwt({'email': 'ops@x.test'})}",
        "Authorization": f"Bearer {jwt({'email': 'a@x.test'})}",
    }
    assert caller(sent.get, "id_token", IDENTITIES).identity == "ops@x.test"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Basic YTpi",
        "Bearer not-a-jwt",
        "Bearer a.!!!.c",
        f"Bearer {jwt({'sub': '123'})}",
        f"Bearer {jwt({'email': 'a@x.test', 'email_verified': False})}",
        "Bearer " + base64.urlsafe_b64encode(b"h").decode() + "." + base64.urlsafe_b64encode(b"[1]").decode(),
    ],
)
def test_id_token_mode_without_a_readable_verified_email_is_unauthenticated(
    authorization: str | None,
) -> None:
    sent = {"Authorization": authorization} if authorization else {}
    with pytest.raises(Unauthenticated):
        caller(sent.get, "id_token", IDENTITIES)


def test_the_local_header_is_no_identity_in_id_token_mode() -> None:
    with pytest.raises(Unauthenticated):
        caller({IDENTITY_HEADER: "a@x.test"}.get, "id_token", IDENTITIES)
