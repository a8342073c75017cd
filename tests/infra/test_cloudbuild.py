"""cloudbuild.yaml: it parses, and its steps are, in order, lint, test (with a Postgres), bundle,
migrate, terraform init, plan, apply, and a smoke call to health, each wired to the one before."""

from __future__ import annotations

import itertools
import re
from functools import cache
from typing import Any

import yaml

from tests.infra.hcl import ROOT, Config

CLOUDBUILD = ROOT / "cloudbuild.yaml"
ORDER = [
    "lint",
    "test",
    "bundle",
    "migrate",
    "terraform-init",
    "terraform-plan",
    "terraform-apply",
    "smoke-health",
]


@cache
def build() -> dict[str, Any]:
    data = yaml.safe_load(CLOUDBUILD.read_text())
    assert isinstance(data, dict)
    return data


def steps() -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in build()["steps"]}


def script(step_id: str) -> str:
    step = steps()[step_id]
    assert "script" in step, f"{step_id}: expected a script"
    return str(step["script"])


def commands(step_id: str) -> str:
    """The script without comment lines."""
    return "\n".join(ln for ln in script(step_id).splitlines() if not ln.lstrip().startswith("#"))


def test_every_step_is_named_and_in_order() -> None:
    ids = [s.get("id") for s in build()["steps"]]
    assert all(ids), "every step has an id"
    assert len(ids) == len(set(ids))
    assert [i for i in ids if i in ORDER] == ORDER
    assert set(ids) - set(ORDER) == {"postgres"}, "only the Postgres service step is extra"
    assert ids.index("postgres") < ids.index("test")


def test_each_step_waits_for_the_one_before() -> None:
    by_id = steps()
    assert set(by_id["test"]["waitFor"]) == {"lint", "postgres"}
    for before, after in itertools.pairwise(ORDER[1:]):
        assert by_id[after]["waitFor"] == [before], f"{after} must wait for {before}"


def test_tests_run_against_a_postgres() -> None:
    pg = script("postgres")
    assert re.search(r"docker run .*--name postgres", pg.replace("\\\n", " "))
    assert "--network cloudbuild" in pg and "postgres:16" in pg and "pg_isready" in pg
    env = dict(item.split("=", 1) for item in steps()["test"]["env"])
    assert (
        env["TEST_DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["TEST_DATABASE_URL"]
    )
    assert env["CI"] == "true"
    assert ".ci/run" in commands("test")
    assert "make lint" in commands("lint")


def test_bundle_then_migrate_with_a_secret() -> None:
    assert "make bundle" in commands("bundle")
    migrate = steps()["migrate"]
    assert migrate["secretEnv"] == ["MIGRATIONS_DATABASE_URL"]
    assert 'python -m shared.store.migrate "$MIGRATIONS_DATABASE_URL"' in commands("migrate")
    secrets = build()["availableSecrets"]["secretManager"]
    assert [s["env"] for s in secrets] == ["MIGRATIONS_DATABASE_URL"]
    assert secrets[0]["versionName"].startswith("projects/$PROJECT_ID/secrets/")
    # The migrations secret is one Terraform knows (and keeps out of the functions' environment).
    catalog = Config().locals["secret_catalog"]
    default = build()["substitutions"]["_MIGRATIONS_SECRET"]
    assert {"secret_id": default, "env": ""}.items() <= catalog["migrations_database_url"].items()


def test_terraform_init_plan_apply() -> None:
    for step_id in ("terraform-init", "terraform-plan", "terraform-apply"):
        step = steps()[step_id]
        assert step["name"].startswith("hashicorp/terraform:")
        assert step["dir"] == "infra/terraform"
    assert "terraform init -input=false -backend-config=" in commands("terraform-init")
    plan = commands("terraform-plan")
    assert "terraform plan -input=false -out=tfplan" in plan
    for var in ("project=${PROJECT_ID}", "region=${_REGION}", "deployer_member=serviceAccount:"):
        assert var in plan
    apply = commands("terraform-apply")
    assert "terraform apply -input=false tfplan" in apply
    assert "terraform output -json > /workspace/terraform-outputs.json" in apply
    # Every variable the plan sets exists.
    variables = Config().variables
    for name in re.findall(r'-var="([a-z_]+)=', plan):
        assert name in variables, name


def test_smoke_calls_health_with_an_identity_token() -> None:
    smoke = commands("smoke-health")
    assert '["health_url"]' in smoke
    assert "health_url" in Config().outputs
    assert "gcloud auth print-identity-token --audiences=" in smoke
    assert "Authorization: Bearer" in smoke
    assert '"200"' in smoke and "healthy" in smoke, "only 200 healthy passes"
    assert "exit 1" in smoke


def test_scripts_get_substitutions_as_environment() -> None:
    options = build()["options"]
    assert options["automapSubstitutions"] is True
    assert options["logging"] == "CLOUD_LOGGING_ONLY"
    for step in build()["steps"]:
        assert "args" not in step, f"{step['id']}: scripts only (substitutions reach them as env)"
        first = str(step["script"]).splitlines()[0]
        assert first.startswith("#!"), f"{step['id']}: the script names its shell"
        if step["name"].startswith("hashicorp/terraform"):
            assert first == "#!/bin/sh", "the terraform image has no bash"
