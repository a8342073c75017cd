"""infra/terraform, checked statically (nothing here can reach Google Cloud): every file parses, the
wiring is what the code needs (entry points, tasks, the sweep chain, invokers, secrets, environment)
and checkov finds nothing. A mistake in the wiring fails one of these."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from shared.domain import longest_delivery_seconds
from tests.infra.hcl import ROOT, TF_DIR, Block, Config, entry_points, squash

README = ROOT / "README.md"
WEB_PY = ROOT / "shared" / "web.py"
SERVICE_DIR = ROOT / "shared" / "service"

# The environment variables that carry credentials: Secret Manager only, never plain.
SECRET_ENV = {
    "DATABASE_URL",
    "SUPABASE_SERVICE_KEY",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "ANTHROPIC_API_KEY",
}
# Local-only switches that must never reach a deployment.
LOCAL_ONLY_ENV = {
    "TWILIO_SIGNATURE_BYPASS",
    "TWILIO_API_BASE_URL",
    "CLOUD_TASKS_EMULATOR_HOST",
    "PUBSUB_EMULATOR_HOST",
}


@cache
def config() -> Config:
    return Config()


@cache
def functions() -> dict[str, dict[str, Any]]:
    fns: dict[str, dict[str, Any]] = config().locals["functions"]
    return fns


def fn_resource() -> Block:
    return config().resource("google_cloudfunctions2_function", "fn")


def ref(expr: str) -> str:
    """'${a.b}' -> 'a.b' (whitespace removed)."""
    s = squash(expr)
    assert s.startswith("${") and s.endswith("}"), f"not a reference: {expr!r}"
    return s[2:-1]


def env_names(group: Any) -> set[str]:
    """The variable names an env group may set (a literal map, a filtered map, or var.settings)."""
    if isinstance(group, dict):
        return set(group)
    text = str(group)
    if squash(text) == "${var.settings}":
        return settings_names()
    return set(re.findall(r"['\"]?\b([A-Z][A-Z0-9_]{2,})\b['\"]?\s*[:=](?![=>])", text))


@cache
def settings_names() -> set[str]:
    """The names var.settings may hold (its validation list)."""
    condition = config().variables["settings"].block("validation")["condition"]
    names = set(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", str(condition)))
    assert names, "var.settings has no list of allowed names"
    return names


def env_of(fn: str) -> set[str]:
    groups = config().locals["env"]
    names: set[str] = set()
    for g in functions()[fn]["env"]:
        assert g in groups, f"{fn}: env group {g!r} does not exist in local.env"
        names |= env_names(groups[g])
    return names


def secret_env_of(fn: str) -> set[str]:
    catalog = config().locals["secret_catalog"]
    return {catalog[s]["env"] for s in functions()[fn]["secrets"]}


@cache
def readme_names() -> set[str]:
    return set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", README.read_text()))


# --- every file parses ---------------------------------------------------------------------------


def tf_files() -> list[Path]:
    return sorted(TF_DIR.glob("*.tf"))


def test_terraform_files_exist() -> None:
    names = {p.name for p in tf_files()}
    assert {"versions.tf", "variables.tf", "main.tf", "functions.tf", "outputs.tf"} <= names


@pytest.mark.parametrize("path", tf_files(), ids=lambda p: p.name)
def test_every_tf_file_parses(path: Path) -> None:
    parsed = {k: v for k, v in config().files[path.name].items() if not k.startswith("__")}
    known = {"terraform", "provider", "variable", "locals", "resource", "data", "output", "import", "check"}
    assert parsed, f"{path.name} is empty"
    assert set(parsed) <= known, f"{path.name}: unexpected top-level blocks {set(parsed) - known}"


def test_inputs_the_issue_asks_for() -> None:
    variables = config().variables
    for name in ("project", "region", "sender_throughput_per_second", "sweep_schedule", "agents"):
        assert name in variables, f"variable {name} is missing"
    assert "agent_members" not in variables, "agents (by type, with their agent ids) replaced agent_members"
    assert variables["sweep_schedule"]["default"] == "* * * * *"
    assert "default" not in variables["project"], "the project must be given, never defaulted"
    assert "default" not in variables["agents"], "who may schedule must be given"


# --- functions ----------------------------------------------------------------------------------


def test_every_entry_point_is_deployed_from_the_bundle() -> None:
    eps = entry_points()
    assert {"schedule_message", "deliver_message", "sweep_queue", "process_queue", "health"} <= set(eps)
    assert set(functions()) == set(eps), "local.functions must list exactly functions/main.py's entry points"
    service_names = config().locals["service_names"]
    for name, signature in eps.items():
        fn = functions()[name]
        assert fn["entry_point"] == name
        assert ref(fn["name"]) == f"local.service_names.{name}"
        service = service_names[name]
        assert service == name.replace("_", "-"), f"{name}: Cloud Run service name {service!r}"
        # The deterministic run.app URL exists only while SERVICE-PROJECT_NUMBER fits one DNS label.
        assert len(service) + 1 + 12 <= 63
        assert (fn["trigger"] is not None) == (signature == "cloudevent"), f"{name}: trigger vs signature"

    res = fn_resource()
    assert ref(res["for_each"]) == "local.functions"
    assert ref(res["name"]) == "each.value.name"
    build = res.block("build_config")
    assert ref(build["entry_point"]) == "each.value.entry_point"
    storage = build.block("source").block("storage_source")
    assert ref(storage["bucket"]) == "google_storage_bucket.source.name"
    assert ref(storage["object"]) == "google_storage_bucket_object.source.name"
    obj = config().resource("google_storage_bucket_object", "source")
    assert "filemd5(local.source_archive)" in squash(obj["name"]), "a new bundle must be a new object"
    assert "dist/function-source.zip" in config().locals["source_archive"]


def test_every_function_has_explicit_memory_timeout_instances_and_environment() -> None:
    for name, fn in functions().items():
        assert re.fullmatch(r"\d+(Mi|Gi)", fn["memory"]), name
        assert isinstance(fn["timeout_seconds"], int) and 1 <= fn["timeout_seconds"] <= 540, name
        assert fn["max_instances"] not in (None, ""), name
        assert fn["env"] and "base" in fn["env"], name
        assert fn["ingress"] in {"ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"}, name
    sc = fn_resource().block("service_config")
    assert ref(sc["available_memory"]) == "each.value.memory"
    assert ref(sc["timeout_seconds"]) == "each.value.timeout_seconds"
    assert ref(sc["max_instance_count"]) == "each.value.max_instances"
    assert ref(sc["ingress_settings"]) == "each.value.ingress"
    assert squash(sc["service_account_email"]) == squash(
        '${each.value.account == "webhooks" ? google_service_account.webhooks.email'
        " : google_service_account.runtime.email}"
    )
    env_expr = squash(sc["environment_variables"])
    assert "each.value.env" in env_expr and "local.env[group]" in env_expr


@cache
def web_needs() -> dict[str, set[str]]:
    """For each entry point: the Container adapters its handler in shared/web.py uses (c.store,
    c.tasks, c.sms, c.events), following calls within web.py; plus 'signature' when it checks
    Twilio's signature (which needs TWILIO_AUTH_TOKEN)."""
    module = ast.parse(WEB_PY.read_text())
    defs = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}

    def direct(fn: ast.FunctionDef) -> tuple[set[str], set[str]]:
        uses: set[str] = set()
        calls: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "c":
                uses.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defs:
                calls.add(node.func.id)
        if "_check_twilio_signature" in calls:
            uses.add("signature")
        return uses, calls

    def closure(name: str, seen: set[str]) -> set[str]:
        if name in seen:
            return set()
        seen.add(name)
        uses, calls = direct(defs[name])
        for callee in calls:
            uses |= closure(callee, seen)
        return uses

    handlers: dict[str, str] = {}
    for node in ast.parse((ROOT / "functions" / "main.py").read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "web"
                ):
                    handlers[node.name] = call.func.attr
    return {ep: closure(handler, set()) for ep, handler in handlers.items()}


def test_each_function_gets_what_its_code_uses() -> None:
    needs = web_needs()
    assert set(needs) == set(entry_points())
    for name, uses in needs.items():
        env = env_of(name)
        secrets = secret_env_of(name)
        if "store" in uses:
            assert {"DATABASE_URL", "SUPABASE_SERVICE_KEY"} <= secrets, f"{name} reads the database"
            assert "database" in functions()[name]["env"], f"{name}: SUPABASE_URL in rest mode"
        if "tasks" in uses:
            assert {"DELIVER_URL", "TASKS_SERVICE_ACCOUNT", "TASKS_QUEUE", "TASKS_LOCATION"} <= env, name
            assert "GOOGLE_CLOUD_PROJECT" in env, name
        if "sms" in uses:
            assert {"TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"} <= secrets, f"{name} calls Twilio"
            assert {"TWILIO_PHONE_NUMBER", "TWILIO_MESSAGING_SERVICE_SID"} <= env, f"{name} needs a sender"
        if "events" in uses:
            assert {"EVENTS_TOPIC", "INBOUND_TOPIC"} <= env, f"{name} publishes events"
        if "signature" in uses:
            assert "TWILIO_AUTH_TOKEN" in secrets, f"{name} checks Twilio's signature"
            # ...against the exact URL Twilio signs, its own deterministic one, never a URL rebuilt
            # from the caller's X-Forwarded-Host.
            group = {"twilio_inbound": "webhook_inbound", "twilio_status": "webhook_status"}[name]
            assert group in functions()[name]["env"], name
            assert config().locals["env"][group]["TWILIO_WEBHOOK_BASE_URL"] == (
                f"https://${{local.service_hosts.{name}}}"
            )
    # deliver_message gives Twilio its status callback: twilio_status's URL.
    assert config().locals["env"]["status_callback"]["STATUS_CALLBACK_URL"] == (
        "https://${local.service_hosts.twilio_status}"
    )
    assert "status_callback" in functions()["deliver_message"]["env"]


def test_environment_names_are_documented_and_credentials_are_never_plain() -> None:
    documented = readme_names()
    for name in functions():
        plain = env_of(name)
        assert not plain & SECRET_ENV, f"{name}: credentials in plain environment: {plain & SECRET_ENV}"
        assert not plain & LOCAL_ONLY_ENV, f"{name}: local-only switches deployed: {plain & LOCAL_ONLY_ENV}"
        undocumented = (plain | secret_env_of(name)) - documented
        assert not undocumented, f"{name} sets variables README.md does not document: {undocumented}"
    assert settings_names() <= documented
    assert not settings_names() & (SECRET_ENV | LOCAL_ONLY_ENV)


# --- the delivery queue -----------------------------------------------------------------------------


def test_tasks_call_deliver_message_as_the_tasks_account() -> None:
    loc = config().locals
    # DELIVER_URL is deliver_message's own (deterministic) URL, for every function that creates tasks.
    assert loc["service_names"]["deliver_message"] == "deliver-message"
    assert "${name}-${data.google_project.this.number}.${var.region}.run.app" in loc["service_hosts"]
    assert ref(loc["deliver_host"]) == "local.service_hosts.deliver_message"
    assert loc["deliver_url"] == "https://${local.deliver_host}"
    tasks_env = loc["env"]["tasks"]
    assert ref(tasks_env["DELIVER_URL"]) == "local.deliver_url"
    assert ref(tasks_env["TASKS_SERVICE_ACCOUNT"]) == "google_service_account.tasks.email"
    assert ref(tasks_env["TASKS_QUEUE"]) == "google_cloud_tasks_queue.delivery.name"
    assert ref(tasks_env["TASKS_LOCATION"]) == "var.region"

    queue = config().resource("google_cloud_tasks_queue", "delivery")
    target = queue.block("http_target")
    uri = target.block("uri_override")
    assert ref(uri["host"]) == "local.deliver_host"
    assert uri["scheme"] == "HTTPS"
    assert uri["uri_override_enforce_mode"] == "ALWAYS"
    oidc = target.block("oidc_token")
    assert ref(oidc["service_account_email"]) == "google_service_account.tasks.email"
    assert ref(oidc["audience"]) == "local.deliver_url"


def test_queue_paces_at_the_sender_throughput_and_retries_with_backoff() -> None:
    queue = config().resource("google_cloud_tasks_queue", "delivery")
    rate = queue.block("rate_limits")
    assert ref(rate["max_dispatches_per_second"]) == "var.sender_throughput_per_second"
    assert ref(rate["max_concurrent_dispatches"]) == "var.delivery_concurrency"
    assert ref(functions()["deliver_message"]["max_instances"]) == "var.delivery_concurrency"
    retry = queue.block("retry_config")
    for key in ("max_attempts", "min_backoff", "max_backoff", "max_doublings"):
        assert ref(retry[key]) == f"var.task_retry.{key}"
    retry_type = squash(config().variables["task_retry"]["type"])
    for key in ("max_attempts", "min_backoff", "max_backoff", "max_doublings"):
        assert re.search(rf"{key}['\"]?[:=]['\"]?\$?\{{?optional\(", retry_type), f"task_retry.{key} default"


def test_runtime_may_enqueue_and_hand_out_only_the_tasks_identity() -> None:
    enqueue = config().resource("google_cloud_tasks_queue_iam_member", "runtime_enqueues")
    assert enqueue["role"] == "roles/cloudtasks.enqueuer"
    assert ref(enqueue["name"]) == "google_cloud_tasks_queue.delivery.name"
    assert ref(enqueue["member"]) == "google_service_account.runtime.member"
    acts_as = config().resources["google_service_account_iam_member"]
    assert set(acts_as) == {"runtime_acts_as_tasks"}
    grant = acts_as["runtime_acts_as_tasks"]
    assert ref(grant["service_account_id"]) == "google_service_account.tasks.name"
    assert grant["role"] == "roles/iam.serviceAccountUser"
    assert ref(grant["member"]) == "google_service_account.runtime.member"
    # Project-wide, the service accounts only write logs.
    for _, grant in config().resources.get("google_project_iam_member", {}).items():
        assert grant["role"] == "roles/logging.logWriter"
    assert not config().resources.get("google_project_iam_binding")
    assert not config().resources.get("google_project_iam_policy")


# --- the sweep --------------------------------------------------------------------------------------


def test_scheduler_publishes_to_the_sweep_topic_which_triggers_sweep_queue() -> None:
    job = config().resource("google_cloud_scheduler_job", "sweep")
    assert ref(job["schedule"]) == "var.sweep_schedule"
    assert ref(job.block("pubsub_target")["topic_name"]) == "google_pubsub_topic.sweep.id"

    trigger = functions()["sweep_queue"]["trigger"]
    assert trigger["event_type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert ref(trigger["pubsub_topic"]) == "google_pubsub_topic.sweep.id"
    assert ref(trigger["service_account_email"]) == "google_service_account.scheduler.email"
    assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
    dyn = fn_resource().dynamic("event_trigger")
    assert "each.value.trigger" in squash(dyn["for_each"])
    content = dyn.block("content")
    for key in ("event_type", "pubsub_topic", "service_account_email", "retry_policy"):
        assert ref(content[key]) == f"trigger.value.{key}"
    assert ref(content["trigger_region"]) == "var.region"
    # Only sweep_queue is event-triggered.
    assert [n for n, f in functions().items() if f["trigger"] is not None] == ["sweep_queue"]
    # Nothing else publishes to the sweep topic.
    for rtype, name, block in config().all_resources():
        if rtype.startswith("google_pubsub_topic_iam"):
            assert "google_pubsub_topic.sweep" not in squash(block.get("topic", "")), name
    assert ref(config().locals["env"]["pubsub"]["SWEEP_TOPIC"]) == "google_pubsub_topic.sweep.name"


def test_sweep_has_time_for_its_budget() -> None:
    budget = Settings.from_env({}).sweep_time_budget_seconds
    timeout = functions()["sweep_queue"]["timeout_seconds"]
    assert timeout >= 60 and timeout >= budget + 30, f"sweep timeout {timeout}s, budget {budget}s"
    assert functions()["process_queue"]["timeout_seconds"] >= budget + 30


def test_a_delivery_never_outlives_its_function_or_its_claim() -> None:
    """The longest sequence (5 parts, each Twilio call up to its connect and read timeouts, the
    longest pauses) fits in deliver_message's timeout, and the claim's lease outlasts the function:
    a sender still running can never find its lease taken by the sweep's reconciler."""
    settings = Settings.from_env({})
    longest = longest_delivery_seconds(settings.twilio_timeout_seconds)
    timeout = functions()["deliver_message"]["timeout_seconds"]
    assert longest <= timeout < settings.lease_seconds, (longest, timeout, settings.lease_seconds)
    condition = str(config().variables["settings"].block("validation")["condition"])
    # Either may be tuned in var.settings: shared/config.py refuses a lease shorter than the longest
    # delivery for the timeout it is given.
    assert "CLAIM_LEASE_SECONDS" in condition and "TWILIO_TIMEOUT_SECONDS" in condition
    with pytest.raises(ValueError, match="CLAIM_LEASE_SECONDS must be at least 280"):
        Settings.from_env({"TWILIO_TIMEOUT_SECONDS": "22", "CLAIM_LEASE_SECONDS": "240"})


# --- who may invoke what ----------------------------------------------------------------------------

INVOKER_ROLES = {"roles/run.invoker", "roles/cloudfunctions.invoker", "roles/run.servicesInvoker"}


def test_only_the_tasks_account_invokes_deliver_message() -> None:
    loc = config().locals
    deliver = functions()["deliver_message"]
    assert deliver["invokers"] == {"tasks": "${local.tasks_invoker}"}
    assert deliver["public"] is False
    assert ref(loc["tasks_invoker"]) == "google_service_account.tasks.member"
    assert deliver["ingress"] == "ALLOW_INTERNAL_ONLY"
    bindings = squash(loc["invoker_bindings"])
    assert "local.functions" in bindings and "cfg.invokers" in bindings

    # Every invoker grant anywhere is one of the two resources below.
    invoker_grants = []
    for rtype, name, block in config().all_resources():
        if re.search(r"_iam_(member|binding|policy)$", rtype) and block.get("role") in INVOKER_ROLES:
            invoker_grants.append((rtype, name))
        assert not (re.search(r"(cloud_run|cloudfunctions).*_iam_(binding|policy)$", rtype)), (
            f"{rtype}.{name}: authoritative IAM on a function"
        )
    assert sorted(invoker_grants) == [
        ("google_cloud_run_service_iam_member", "invoker"),
        ("google_cloud_run_service_iam_member", "public_webhook"),
    ]
    invoker = config().resource("google_cloud_run_service_iam_member", "invoker")
    assert ref(invoker["for_each"]) == "local.invoker_bindings"
    assert ref(invoker["member"]) == "each.value.member"
    assert ref(invoker["service"]) == "google_cloudfunctions2_function.fn[each.value.function].name"
    public = config().resource("google_cloud_run_service_iam_member", "public_webhook")
    assert public["member"] == "allUsers"
    assert "f.public" in squash(public["for_each"])
    assert ref(public["service"]) == "google_cloudfunctions2_function.fn[each.key].name"


def test_who_may_call_each_function() -> None:
    fns = functions()
    assert ref(fns["schedule_message"]["invokers"]) == "{forminlocal.schedule_invokers:m=>m}"
    schedule_invokers = squash(config().locals["schedule_invokers"])
    assert "local.agent_members" in schedule_invokers and "var.operator_members" in schedule_invokers
    assert "var.agents" in squash(config().locals["agent_members"])
    assert "var.operator_members" in squash(fns["process_queue"]["invokers"])
    assert "var.operator_members" in squash(fns["health"]["invokers"])
    assert "var.deployer_member" in squash(fns["health"]["invokers"])
    assert fns["sweep_queue"]["invokers"] == {"scheduler": "${local.sweep_invoker}"}
    assert ref(config().locals["sweep_invoker"]) == "google_service_account.scheduler.member"
    # Public: Twilio's webhooks only, which check X-Twilio-Signature themselves.
    public = {n for n, f in fns.items() if f["public"]}
    assert public == {n for n in fns if n.startswith("twilio_")}
    for name in public:
        assert "signature" in web_needs()[name], f"{name} is public but does not check Twilio's signature"
        assert fns[name]["invokers"] == {}
    for name, fn in fns.items():
        if not fn["public"] and fn["trigger"] is None and fn["ingress"] == "ALLOW_ALL":
            assert fn["invokers"], f"{name} is reachable but nobody may call it"


def test_allusers_only_on_the_twilio_webhooks() -> None:
    def walk(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [s for v in value for s in walk(v)]
        if isinstance(value, dict):
            return [s for v in value.values() for s in walk(v)]
        return []

    for rtype, name, block in config().all_resources():
        strings = walk({k: block[k] for k in block.raw if k != "dynamic"})
        if any(s in ("allUsers", "allAuthenticatedUsers") for s in strings):
            assert (rtype, name) == ("google_cloud_run_service_iam_member", "public_webhook")
    condition = squash(config().variables["operator_members"].block("validation")["condition"])
    assert "serviceAccount|group|user" in condition, "operator_members must only accept IAM members"
    # Agents: only identities whose ID token carries an email (tests/infra/test_agents.py).
    conditions = [squash(v["condition"]) for v in config().variables["agents"].blocks("validation")]
    assert any("^(serviceAccount|user):" in c for c in conditions), "agents' members must be accounts"


# --- secrets ------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "Twilio account SID": r"\bAC[0-9a-f]{32}\b",
    "32-hex token": r"\b[0-9a-f]{32}\b",
    "Anthropic key": r"sk-ant-[A-Za-z0-9_-]{10,}",
    "JWT (Supabase key)": r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
    "URL with a password": r"[a-z][a-z0-9+.-]*://[^/\s:@\"']+:[^@\s\"'$]+@",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
}


@pytest.mark.parametrize("path", [*tf_files(), TF_DIR / "terraform.tfvars.example"], ids=lambda p: p.name)
def test_no_secret_value_in_terraform(path: Path) -> None:
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name} contains what looks like a {what}"
    # Values are added by the operator with gcloud, so they never enter the plan or the state.
    assert "google_secret_manager_secret_version" not in text
    assert "secret_data" not in text


def test_functions_read_credentials_from_secret_manager() -> None:
    catalog = config().locals["secret_catalog"]
    assert {v["env"] for v in catalog.values()} - {""} == SECRET_ENV
    dyn = fn_resource().block("service_config").dynamic("secret_environment_variables")
    assert "each.value.secrets" in squash(dyn["for_each"]) and "local.secrets" in squash(dyn["for_each"])
    content = dyn.block("content")
    assert ref(content["key"]) == "local.secrets[secret.value].env"
    assert ref(content["secret"]) == "google_secret_manager_secret.secret[secret.value].secret_id"
    assert content["version"] == "latest"

    secret = config().resource("google_secret_manager_secret", "secret")
    assert ref(secret["for_each"]) == "local.secrets"
    assert ref(secret["secret_id"]) == "each.value.secret_id"
    assert secret.block("lifecycle")["prevent_destroy"] is True, "Terraform must never delete a credential"
    imports = [i for i in config().imports if "google_secret_manager_secret.secret" in squash(i["to"])]
    assert len(imports) == 1, "the operator's secrets are adopted with one import block"
    assert ref(imports[0]["for_each"]) == "local.secrets"
    reads = config().resource("google_secret_manager_secret_iam_member", "reads")
    assert reads["role"] == "roles/secretmanager.secretAccessor"
    assert ref(reads["for_each"]) == "local.secret_readers"
    assert "google_secret_manager_secret.secret[each.value.secret]" in squash(reads["secret_id"])
    assert "google_service_account.webhooks.member" in squash(reads["member"])
    for name, fn in functions().items():
        unknown = set(fn["secrets"]) - set(catalog)
        assert not unknown, f"{name}: unknown secrets {unknown}"


def test_the_public_webhooks_run_as_an_account_that_can_do_little() -> None:
    """twilio_inbound and twilio_status are public (Twilio cannot show a Google identity): they run
    as their own account, which reads only the database and the Twilio auth token, publishes events,
    and can neither create tasks nor mint the tasks' identity nor read the Anthropic key."""
    fns = functions()
    assert {name for name, fn in fns.items() if fn["account"] == "webhooks"} == {
        "twilio_inbound",
        "twilio_status",
    }
    assert {fn["account"] for name, fn in fns.items() if not name.startswith("twilio_")} == {"runtime"}
    for name in ("twilio_inbound", "twilio_status"):
        assert set(fns[name]["secrets"]) <= {"database_url", "supabase_service_key", "twilio_auth_token"}, (
            name
        )
    webhooks = "google_service_account.webhooks.member"
    members = {
        (rtype, rname): squash(block.get("member", ""))
        for rtype, rname, block in config().all_resources()
        if "member" in block
    }
    granted = {key for key, member in members.items() if webhooks in member}
    assert {key[0] for key in granted} == {
        "google_project_iam_member",  # log writing
        "google_secret_manager_secret_iam_member",  # its functions' secrets (local.secret_readers)
        "google_pubsub_topic_iam_member",  # events and inbound
    }, granted
    assert ("google_project_iam_member", "webhooks_log_writer") in granted


# --- monitoring ---------------------------------------------------------------------------------------


def test_log_metrics_match_what_the_code_logs() -> None:
    service = "\n".join(p.read_text() for p in sorted(SERVICE_DIR.glob("*.py")))
    metrics = config().resources["google_logging_metric"]
    assert {"sent", "failed", "deferred", "reconciled", "sweeps", "overdue"} <= set(metrics)
    for name, action in (("sent", "sent"), ("failed", "failed"), ("deferred", "deferred")):
        assert f'jsonPayload.action=\\"{action}\\"' in metrics[name]["filter"]
        logged = rf'answer\(\s*logging\.\w+,\s*(?:"{action}"|{action.upper()}),'
        assert re.search(logged, service), f"deliver no longer logs action {action!r}"
    for name in ("failed", "deferred"):
        assert metrics[name]["label_extractors"] == {"reason": "EXTRACT(jsonPayload.reason)"}
    # Reconciliation messages: "reconciled: ...; recorded" / "...; queued again".
    reconciled = re.findall(r'"(reconciled: [^"]*)"', service)
    assert reconciled, "the code no longer logs 'reconciled: ...'"
    extractor = metrics["reconciled"]["label_extractors"]["outcome"]
    pattern = re.search(r'REGEXP_EXTRACT\(jsonPayload\.message, \\?"(.*?)\\?"\)', extractor)
    assert pattern, extractor
    for message in reconciled:
        assert re.search(pattern.group(1).replace("\\\\", "\\"), message), message
    sweep_log = config().locals["sweep_log"]
    assert '"sweep finished"' in service and 'jsonPayload.message="sweepfinished"' in squash(
        sweep_log
    ).replace("\\", "")
    assert "overdue_requeued" in Path(ROOT / "shared" / "models.py").read_text()
    assert metrics["overdue"]["value_extractor"] == "EXTRACT(jsonPayload.overdue_requeued)"
    # The functions' log lines carry `message`, `action`, `reason` at the top level of the JSON.
    log_py = (ROOT / "shared" / "log.py").read_text()
    assert '"message": record.getMessage()' in log_py


def test_alerts_and_dashboard() -> None:
    alerts = config().resources["google_monitoring_alert_policy"]
    assert set(alerts) == {"failure_rate", "overdue_backlog", "sweep_stale"}
    expected = {
        "failure_rate": "google_logging_metric.failed",
        "overdue_backlog": "google_logging_metric.overdue",
        "sweep_stale": "google_logging_metric.sweeps",
    }
    for name, metric in expected.items():
        cond = alerts[name].block("conditions")
        inner = cond.blocks("condition_threshold") or cond.blocks("condition_absent")
        assert len(inner) == 1
        assert metric in squash(inner[0]["filter"]), name
        assert "local.notification_channels" in squash(alerts[name]["notification_channels"])
    ratio = alerts["failure_rate"].block("conditions").block("condition_threshold")
    assert "google_logging_metric.finished" in squash(ratio["denominator_filter"])
    absent = alerts["sweep_stale"].block("conditions").block("condition_absent")
    assert "var.sweep_stale_seconds" in squash(absent["duration"])
    dashboards = config().resources["google_monitoring_dashboard"]
    assert len(dashboards) == 1
    body = squash(next(iter(dashboards.values()))["dashboard_json"])
    for metric in ("sent", "failed", "deferred", "reconciled"):
        assert f"google_logging_metric.{metric}.name" in body


def test_outputs() -> None:
    outputs = config().outputs
    assert {"function_urls", "queue_name", "health_url", "deliver_url"} <= set(outputs)
    assert "google_cloudfunctions2_function.fn" in squash(outputs["function_urls"]["value"])
    assert ref(outputs["queue_name"]["value"]) == "google_cloud_tasks_queue.delivery.name"


# --- checkov ------------------------------------------------------------------------------------------


def checkov_bin() -> Path:
    return Path(sys.executable).parent / "checkov"


def test_checkov_finds_nothing() -> None:
    """checkov over infra/terraform, offline: zero failed checks; a skip only inline, with a reason."""
    assert not list(ROOT.glob(".checkov.y*ml")) and not list(TF_DIR.glob(".checkov.y*ml")), (
        "skips belong inline, next to the resource, with their reason"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_", "CKV_", "CHECKOV_"))}
    env |= {"BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [
            str(checkov_bin()),
            "-d",
            str(TF_DIR),
            "--framework",
            "terraform",
            "--compact",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert "cannot import name 'START_LINE' from 'hcl2'" not in proc.stderr, (
        "python-hcl2 overwrote checkov's bc-python-hcl2 (both install the `hcl2` package); "
        "reinstall bc-python-hcl2, or drop python-hcl2 from the dev dependencies"
    )
    assert proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    assert isinstance(report, dict), "expected one report (terraform only)"
    summary = report["summary"]
    failed = report["results"]["failed_checks"]
    assert summary["failed"] == 0 and not failed, "\n".join(
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): {c['check_name']}"
        for c in failed
    )
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0 and summary["resource_count"] >= 40
    for check in report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) >= 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"
    assert proc.returncode == 0, proc.stderr[-2000:]
