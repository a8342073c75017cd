"""Who is calling schedule_message, and which agents they may act as.

In production the function sits behind Cloud Run's IAM check: only an allowed invoker gets through,
with a Google-signed ID token that Cloud Run has already verified. The function only reads the
token's claims (its `email`) and maps that identity to the agent ids it may use
(AGENT_IDENTITIES). A body `agentId` the caller may not use is refused, and a message can be read
or cancelled only by a caller who may act as its agent; "*" stands for every agent (operators).

CALLER_IDENTITY says where the identity comes from:
- `id_token` (deployed): the verified ID token in `X-Serverless-Authorization` or `Authorization`;
- `header` (local stacks and tests, where nothing verifies a token): the `X-Caller-Identity` header;
- `none` (the default off Google Cloud): no identity, every caller may act as every agent.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared.errors import ForbiddenAgent, Unauthenticated

ANY_AGENT = "*"
MODES = ("none", "header", "id_token")
IDENTITY_HEADER = "X-Caller-Identity"
# Cloud Run checks X-Serverless-Authorization first when both are sent (it leaves Authorization to
# the application then), so the identity is read from the header Cloud Run verified.
_TOKEN_HEADERS = ("X-Serverless-Authorization", "Authorization")


def parse_identities(raw: str | None) -> dict[str, frozenset[str]]:
    """AGENT_IDENTITIES: a JSON object, identity (an email) -> the agent ids it may act as."""
    if not raw or not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"AGENT_IDENTITIES must be a JSON object: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("AGENT_IDENTITIES must be a JSON object of identity -> [agent ids]")
    found: dict[str, frozenset[str]] = {}
    for identity, agents in doc.items():
        if not isinstance(agents, list) or not agents or not all(isinstance(a, str) and a for a in agents):
            raise ValueError(f"AGENT_IDENTITIES[{identity!r}] must be a non-empty list of agent ids")
        found[identity.strip().lower()] = frozenset(agents)
    return found


@dataclass(frozen=True)
class Caller:
    """An identified caller and the agents it may act as (None: any agent)."""

    identity: str | None
    agent_ids: frozenset[str] | None

    def may_act_as(self, agent_id: str | None) -> bool:
        return self.agent_ids is None or (agent_id is not None and agent_id in self.agent_ids)

    def require(self, agent_id: str | None, **details: str) -> None:
        """Raise ForbiddenAgent unless this caller may act as `agent_id`."""
        if not self.may_act_as(agent_id):
            raise ForbiddenAgent(
                f"{self.identity or 'this caller'} may not act as agent {agent_id!r}",
                agentId=agent_id,
                **details,
            )


ANYONE = Caller(identity=None, agent_ids=None)


Header = Callable[[str], "str | None"]  # a request's header by name (None: not sent)


def caller(header: Header, mode: str, identities: Mapping[str, frozenset[str]]) -> Caller:
    """The caller of one request, by CALLER_IDENTITY `mode`; raises Unauthenticated without one."""
    if mode == "none":
        return ANYONE
    identity = _from_header(header) if mode == "header" else _from_token(header)
    agents = identities.get(identity, frozenset())
    return Caller(identity=identity, agent_ids=None if ANY_AGENT in agents else agents)


def _from_header(header: Header) -> str:
    identity = (header(IDENTITY_HEADER) or "").strip().lower()
    if not identity:
        raise Unauthenticated(f"the {IDENTITY_HEADER} header is required")
    return identity


def _from_token(header: Header) -> str:
    """The email claim of the bearer ID token. Its signature was checked by Cloud Run before the
    request reached this function (which only an allowed invoker can call); Cloud Run may strip the
    signature, so only the claims segment is read."""
    for name in _TOKEN_HEADERS:
        scheme, _, token = (header(name) or "").strip().partition(" ")
        if scheme.lower() == "bearer" and token:
            claims = _claims(token)
            email = claims.get("email")
            if not isinstance(email, str) or not email or claims.get("email_verified") is False:
                raise Unauthenticated("the ID token carries no verified email claim")
            return email.strip().lower()
    raise Unauthenticated("a bearer ID token is required")


def _claims(token: str) -> dict[str, object]:
    segments = token.strip().split(".")
    if len(segments) < 2:
        raise Unauthenticated("the bearer token is not a JWT")
    payload = segments[1] + "=" * (-len(segments[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("the bearer token's claims cannot be read") from exc
    if not isinstance(claims, dict):
        raise Unauthenticated("the bearer token's claims cannot be read")
    return claims
