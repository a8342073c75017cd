"""The agents in infra/terraform: var.agents (agent type -> members and agent ids) makes who may call
schedule_message, what AGENT_IDENTITIES binds each caller's email to, and one events and one
inbound subscription per agent type, each filtered to that type and readable by its members only.

The wiring is checked statically (python-hcl2); where terraform is installed, the locals that turn
var.agents into subscriptions, filters, readers and identities are also evaluated by terraform
itself on sample inputs (no provider, no network), and so are the variable's validations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.infra.hcl import TF_DIR, Block, Config, squash


@cache
def config() -> Config:
    return Config()


def ref(expr: str) -> str:
    """'${a.b}' -> 'a.b' (whitespace removed)."""
    s = squash(expr)
    assert s.startswith("${") and s.endswith("}"), f"not a reference: {expr!r}"
    return s[2:-1]


def validations() -> list[tuple[str, str]]:
    """(condition without whitespace, error message) of each validation block of var.agents."""
    return [
        (squash(v["condition"]), v["error_message"])
        for v in config().variables["agents"].blocks("validation")
    ]


# --- the variable -----------------------------------------------------------------------------------


def test_agents_is_a_map_of_types_with_members_and_agent_ids() -> None:
    variables = config().variables
    assert "agent_members" not in variables
    agents = variables["agents"]
    assert "default" not in agents, "who may schedule must be given"
    shape = re.sub(r"['\"]", "", squash(agents["type"]))
    assert re.fullmatch(
        r"\$\{map\(object\(\{(members[:=]\$\{list\(string\)\},?|agent_ids[:=]\$\{list\(string\)\},?){2}\}\)\)\}",
        shape,
    ), shape


# Each rule the brief asks of var.agents, as a pattern one validation condition must match.
AGENT_RULES = {
    "at least one type": r"length\(var\.agents\)>0",
    "types are safe name fragments": r"keys\(var\.agents\).*regex\(\"\^\[a-z\]\[a-z0-9_-\]\{0,\d+\}\$\"",
    "members are serviceAccount: or user: only": r"a\.members.*regex\(\"\^\(serviceAccount\|user\):",
    "every type has members": r"length\(a\.members\)>0",
    "every type has agent ids": r"length\(a\.agent_ids\)>0",
    "agent ids are filter-safe literals": r"a\.agent_ids.*regex\(\"\^\[A-Za-z0-9\]",
    "agent ids are unique across types": (
        r"length\(flatten\(.*a\.agent_ids\]\)\)==length\(distinct\(flatten\("
    ),
    "the events filter fits 256 bytes": r"join\(\"OR\",.*attributes\.agentId=.*<=256",
}


@pytest.mark.parametrize("rule", AGENT_RULES)
def test_agents_are_validated(rule: str) -> None:
    matching = [(c, m) for c, m in validations() if re.search(AGENT_RULES[rule], c)]
    assert len(matching) == 1, f"var.agents: no (or more than one) validation for: {rule}"
    assert len(matching[0][1]) >= 30, f"{rule}: the error message should say what to do"


def test_agent_members_can_never_be_public_or_groups() -> None:
    (members,) = [c for c, _ in validations() if "a.members" in c and "regex" in c]
    pattern = re.search(r'regex\("(.*?)",m\)', members)
    assert pattern, members
    # The HCL string escapes backslashes; what terraform's RE2 sees is the unescaped pattern.
    regex = re.compile(pattern.group(1).replace("\\\\", "\\"))
    for good in ("serviceAccount:concierge@agents-prod.iam.gserviceaccount.com", "user:dev@example.com"):
        assert regex.search(good), good
    for bad in (
        "allUsers",
        "allAuthenticatedUsers",
        "group:agents@example.com",
        "domain:example.com",
        "principalSet://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/*",
        "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/subject/x",
        "serviceAccount:",
        "user:Dev@Example.com",
        "user:a@b.com,user:c@d.com",
    ):
        assert not regex.search(bad), f"{bad!r} must not be an agent member"


# --- schedule_message: who may call it, and as whom -------------------------------------------------


def test_schedule_message_is_invoked_by_agents_and_operators() -> None:
    loc = config().locals
    fn = loc["functions"]["schedule_message"]
    assert ref(fn["invokers"]) == "{forminlocal.schedule_invokers:m=>m}"
    assert ref(loc["schedule_invokers"]) == "distinct(concat(local.agent_members,var.operator_members))"
    assert ref(loc["agent_members"]) == "distinct(flatten([forainvalues(var.agents):a.members]))"


def test_schedule_message_binds_the_callers_id_token_to_agent_ids() -> None:
    loc = config().locals
    assert loc["env"]["identity"] == {
        "CALLER_IDENTITY": "id_token",
        "AGENT_IDENTITIES": "${jsonencode(local.agent_identities)}",
    }
    takes = [name for name, fn in loc["functions"].items() if "identity" in fn["env"]]
    assert takes == ["schedule_message"], "only schedule_message takes agents' calls"
    identities = squash(loc["agent_identities"])
    assert "local.member_agent_ids" in identities and "local.operator_emails" in identities
    assert "=>['*']" in identities.replace('"', "'"), "operators act as any agent"
    assert "sort(distinct(flatten(ids)))" in identities, "a member of several types gets the union"
    # The email is the member without its serviceAccount:/user: prefix; operators only with one.
    assert 'regex("^(?:serviceAccount|user):(.+)$",pair.member)[0]' in squash(loc["member_agent_ids"])
    operators = squash(loc["operator_emails"])
    assert "var.operator_members" in operators and 'ifcan(regex("^(?:serviceAccount|user):' in operators


# --- the subscriptions --------------------------------------------------------------------------------


def agent_subscription() -> Block:
    return config().resource("google_pubsub_subscription", "agents")


def test_one_subscription_per_agent_type_and_topic() -> None:
    loc = config().locals
    assert set(loc["agent_topics"]) == {"events", "inbound"}
    assert ref(loc["agent_topics"]["events"]) == "google_pubsub_topic.events"
    assert ref(loc["agent_topics"]["inbound"]) == "google_pubsub_topic.inbound"
    assert set(loc["agent_filters"]) == {"events", "inbound"}
    events = squash(loc["agent_filters"]["events"])
    assert 'fortype,ainvar.agents:type=>join("OR",[foridina.agent_ids:' in events
    assert 'attributes.agentId=\\"${id}\\"' in events
    inbound = squash(loc["agent_filters"]["inbound"])
    assert 'fortype,ainvar.agents:type=>"attributes.agentType=\\"${type}\\""' in inbound
    subs = squash(loc["agent_subscriptions"])
    assert "local.agent_filters" in subs and '"${topic}/${type}"' in subs

    sub = agent_subscription()
    assert ref(sub["for_each"]) == "local.agent_subscriptions"
    assert squash(sub["name"]) == "${local.agent_topics[each.value.topic].name}-${each.value.type}"
    assert ref(sub["topic"]) == "local.agent_topics[each.value.topic].id"
    assert ref(sub["filter"]) == "each.value.filter"


def test_agent_subscriptions_retry_and_dead_letter() -> None:
    sub = agent_subscription()
    assert sub["ack_deadline_seconds"] == 60
    assert sub["message_retention_duration"] == "604800s"
    assert sub["retain_acked_messages"] is False
    assert sub.block("expiration_policy")["ttl"] == "", "an agent's subscription never expires"
    retry = sub.block("retry_policy")
    assert (retry["minimum_backoff"], retry["maximum_backoff"]) == ("10s", "600s")
    dead = sub.block("dead_letter_policy")
    assert ref(dead["dead_letter_topic"]) == "google_pubsub_topic.dead_letter.id"
    assert dead["max_delivery_attempts"] == 10

    # The Pub/Sub service agent acknowledges what it dead-letters, on every agent subscription.
    source = config().resource("google_pubsub_subscription_iam_member", "dead_letter_source")
    assert ref(source["for_each"]) == "local.agent_subscriptions"
    assert ref(source["subscription"]) == "google_pubsub_subscription.agents[each.key].name"
    assert source["role"] == "roles/pubsub.subscriber"
    assert ref(source["member"]) == "local.pubsub_service_agent"
    publisher = config().resource("google_pubsub_topic_iam_member", "dead_letter_publisher")
    assert ref(publisher["member"]) == "local.pubsub_service_agent"


def test_members_read_only_their_own_types_subscriptions() -> None:
    readers = squash(config().locals["agent_readers"])
    assert "forkey,subinlocal.agent_subscriptions" in readers
    assert "distinct(var.agents[sub.type].members)" in readers, "a type's own members, nobody else"
    read = config().resource("google_pubsub_subscription_iam_member", "agents_read")
    assert ref(read["for_each"]) == "local.agent_readers"
    assert ref(read["subscription"]) == "google_pubsub_subscription.agents[each.value.subscription].name"
    assert read["role"] == "roles/pubsub.subscriber"
    assert ref(read["member"]) == "each.value.member"

    # Nothing else is granted on the agents' subscriptions, and nothing grants them wholesale.
    for rtype, name, block in config().all_resources():
        if rtype == "google_pubsub_subscription_iam_member" and "google_pubsub_subscription.agents" in squash(
            block["subscription"]
        ):
            assert name in {"agents_read", "dead_letter_source"}, name
        assert rtype not in {
            "google_pubsub_subscription_iam_binding",
            "google_pubsub_subscription_iam_policy",
        }
        if rtype.startswith("google_pubsub_topic_iam"):
            assert block["role"] != "roles/pubsub.subscriber", f"{name}: subscriber on a whole topic"


def test_outputs_name_each_types_subscriptions() -> None:
    topics = squash(config().outputs["topics"]["value"])
    assert "fortypeinkeys(var.agents):type=>{fortopicinkeys(local.agent_topics)" in topics
    assert 'google_pubsub_subscription.agents["${topic}/${type}"].name' in topics
    assert ref(config().outputs["agent_identities"]["value"]) == "local.agent_identities"


# --- evaluated by terraform ---------------------------------------------------------------------------

TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed")

# The locals that turn var.agents into what gets deployed; they read only var.* and each other.
AGENT_LOCALS = {
    "main.tf": [
        "agent_members",
        "schedule_invokers",
        "member_agent_ids",
        "operator_emails",
        "agent_identities",
    ],
    "pubsub.tf": ["agent_filters", "agent_subscriptions", "agent_readers"],
}
ATTRIBUTE = re.compile(r"^  [a-z_][a-z0-9_]*\s*=")


def local_sources(path: Path) -> dict[str, str]:
    """Each top-level attribute of the file's locals blocks, as its source text."""
    found: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    inside = False

    def close() -> None:
        if name is not None:
            while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
                lines.pop()
            found[name] = "\n".join(lines)

    for line in path.read_text().splitlines():
        if not inside:
            inside = line.startswith("locals {")
            continue
        if line.startswith("}"):
            close()
            name, lines, inside = None, [], False
        elif ATTRIBUTE.match(line) or line.startswith("  #"):
            close()
            name, lines = None, []
            if ATTRIBUTE.match(line):
                name, lines = line.split("=", 1)[0].strip(), [line]
        elif name is not None:
            lines.append(line)
    return found


def module_for(tmp_path: Path) -> Path:
    """infra/terraform's variables and the agent locals, without resources or providers."""
    module = tmp_path / "module"
    module.mkdir()
    shutil.copy(TF_DIR / "variables.tf", module / "variables.tf")
    body = []
    for file, names in AGENT_LOCALS.items():
        sources = local_sources(TF_DIR / file)
        for name in names:
            assert name in sources, f"local.{name} is no longer in {file}"
            body.append(sources[name])
    outputs = "".join(
        f'output "{n}" {{\n  value = local.{n}\n}}\n' for names in AGENT_LOCALS.values() for n in names
    )
    (module / "agents.tf").write_text("locals {\n" + "\n".join(body) + "\n}\n\n" + outputs)
    return module


def terraform(module: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert TERRAFORM is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env |= {"CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_DATA_DIR": str(module / ".terraform")}
    return subprocess.run(
        [TERRAFORM, f"-chdir={module}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def plan(module: Path, agents: Any, operators: list[str]) -> subprocess.CompletedProcess[str]:
    tfvars = module / "case.tfvars.json"
    tfvars.write_text(
        json.dumps({"project": "my-orchestrator-prod", "agents": agents, "operator_members": operators})
    )
    return terraform(
        module, "plan", "-input=false", "-no-color", "-lock=false", f"-var-file={tfvars}", "-out=case.plan"
    )


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if TERRAFORM is None:
        pytest.skip("terraform is not installed")
    module = module_for(tmp_path_factory.mktemp("agents"))
    init = terraform(module, "init", "-input=false", "-no-color", "-backend=false")
    assert init.returncode == 0, init.stdout + init.stderr
    return module


CONCIERGE = "serviceAccount:concierge@agents-prod.iam.gserviceaccount.com"
COACH = "serviceAccount:coach@agents-prod.iam.gserviceaccount.com"
DEV = "user:dev@example.com"
AGENTS = {
    "concierge": {"members": [CONCIERGE, DEV], "agent_ids": ["concierge", "concierge-reminders"]},
    "coach": {"members": [COACH, DEV], "agent_ids": ["coach_agent"]},
}
OPERATORS = ["group:sms-oncall@example.com", "user:Ops@Example.com", CONCIERGE]


@needs_terraform
def test_terraform_evaluates_subscriptions_readers_and_identities(module: Path) -> None:
    planned = plan(module, AGENTS, OPERATORS)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    shown = terraform(module, "show", "-json", "case.plan")
    assert shown.returncode == 0, shown.stderr
    out = {k: v["value"] for k, v in json.loads(shown.stdout)["planned_values"]["outputs"].items()}

    assert out["agent_subscriptions"] == {
        "events/concierge": {
            "topic": "events",
            "type": "concierge",
            "filter": 'attributes.agentId = "concierge" OR attributes.agentId = "concierge-reminders"',
        },
        "events/coach": {"topic": "events", "type": "coach", "filter": 'attributes.agentId = "coach_agent"'},
        "inbound/concierge": {
            "topic": "inbound",
            "type": "concierge",
            "filter": 'attributes.agentType = "concierge"',
        },
        "inbound/coach": {"topic": "inbound", "type": "coach", "filter": 'attributes.agentType = "coach"'},
    }
    readers = {(r["subscription"], r["member"]) for r in out["agent_readers"].values()}
    assert readers == {
        (f"{topic}/{type_}", member)
        for type_, agent in AGENTS.items()
        for topic in ("events", "inbound")
        for member in agent["members"]
    }
    assert set(out["agent_readers"]) == {f"{sub}/{member}" for sub, member in readers}
    assert set(out["schedule_invokers"]) == {CONCIERGE, COACH, DEV, *OPERATORS}
    assert len(out["schedule_invokers"]) == 5
    assert out["agent_identities"] == {
        "concierge@agents-prod.iam.gserviceaccount.com": ["*"],
        "coach@agents-prod.iam.gserviceaccount.com": ["coach_agent"],
        "dev@example.com": ["coach_agent", "concierge", "concierge-reminders"],
        "ops@example.com": ["*"],
    }


def many_ids(n: int) -> list[str]:
    return [f"agent-number-{i:02}" for i in range(n)]


REJECTED = {
    "no types": ({}, "at least one agent type"),
    "uppercase type": ({"Concierge": {"members": [CONCIERGE], "agent_ids": ["c"]}}, "agent types"),
    "type with a space": ({"con cierge": {"members": [CONCIERGE], "agent_ids": ["c"]}}, "agent types"),
    "allUsers": ({"c": {"members": ["allUsers"], "agent_ids": ["c"]}}, "serviceAccount:EMAIL"),
    "allAuthenticatedUsers": (
        {"c": {"members": ["allAuthenticatedUsers"], "agent_ids": ["c"]}},
        "serviceAccount:",
    ),
    "a group": ({"c": {"members": ["group:agents@example.com"], "agent_ids": ["c"]}}, "serviceAccount:EMAIL"),
    "no members": ({"c": {"members": [], "agent_ids": ["c"]}}, "at least one member"),
    "no agent ids": ({"c": {"members": [CONCIERGE], "agent_ids": []}}, "at least one agent id"),
    "a quote in an id": ({"c": {"members": [CONCIERGE], "agent_ids": ['a" OR "b']}}, "agent ids must be"),
    "the wildcard as an id": ({"c": {"members": [CONCIERGE], "agent_ids": ["*"]}}, "agent ids must be"),
    "an id under two types": (
        {"c": {"members": [CONCIERGE], "agent_ids": ["x"]}, "d": {"members": [COACH], "agent_ids": ["x"]}},
        "only once",
    ),
    "a filter over 256 bytes": ({"c": {"members": [CONCIERGE], "agent_ids": many_ids(7)}}, "256 bytes"),
}


@needs_terraform
@pytest.mark.parametrize("case", REJECTED)
def test_terraform_rejects_bad_agents(module: Path, case: str) -> None:
    agents, message = REJECTED[case]
    planned = plan(module, agents, [])
    output = re.sub(r"[\s│]+", " ", planned.stdout + planned.stderr)
    assert planned.returncode != 0, f"{case}: accepted"
    assert "Invalid value for variable" in output and message in output, output[-2000:]


@needs_terraform
def test_terraform_accepts_a_filter_of_256_bytes(module: Path) -> None:
    # Six ids of 15 characters: 6 * 38 + 5 * 4 = 248 bytes.
    planned = plan(module, {"c": {"members": [CONCIERGE], "agent_ids": many_ids(6)}}, [])
    assert planned.returncode == 0, planned.stdout + planned.stderr
