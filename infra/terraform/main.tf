# The functions and what each of them gets: one map, one entry per entry point of functions/main.py.
# functions.tf deploys every entry of local.functions from the same source bundle.

locals {
  labels = {
    app        = "message-orchestrator"
    managed-by = "terraform"
  }

  source_archive = var.source_archive != "" ? var.source_archive : "${path.module}/../../dist/function-source.zip"

  # The Cloud Run service name of each function (a gen2 function is the Cloud Run service of the
  # same name): lowercase and hyphens, so the service name is exactly this.
  service_names = {
    schedule_message = "schedule-message"
    deliver_message  = "deliver-message"
    sweep_queue      = "sweep-queue"
    process_queue    = "process-queue"
    health           = "health"
    twilio_inbound   = "twilio-inbound"
    twilio_status    = "twilio-status"
  }

  # Each function's URL, known before it exists: Cloud Run's deterministic URL
  # https://SERVICE-PROJECT_NUMBER.REGION.run.app. Functions need each other's URLs (DELIVER_URL for
  # every function that creates tasks, deliver_message included since it re-plans;
  # STATUS_CALLBACK_URL for deliver_message), which cannot be read from the deployed functions
  # without a cycle. Cloud Run accepts any of a service's run.app URLs as the OIDC audience.
  service_hosts = { for k, name in local.service_names : k => "${name}-${data.google_project.this.number}.${var.region}.run.app" }
  deliver_host  = local.service_hosts.deliver_message
  deliver_url   = "https://${local.deliver_host}"

  tasks_invoker = google_service_account.tasks.member
  sweep_invoker = google_service_account.scheduler.member

  # Who the callers of schedule_message are (var.agents). Cloud Run checks the caller's ID token
  # (roles/run.invoker: every agent member, and the operators); the function then reads the token's
  # email and acts only as the agent ids AGENT_IDENTITIES gives that email. A member listed under
  # several types may act as the agent ids of all of them; an operator with an email
  # (serviceAccount:/user:) may act as any agent ("*"), even when it is also an agent member.
  agent_members     = distinct(flatten([for a in values(var.agents) : a.members]))
  schedule_invokers = distinct(concat(local.agent_members, var.operator_members))
  member_agent_ids = {
    for pair in flatten([
      for a in values(var.agents) : [for m in a.members : { member = m, agent_ids = a.agent_ids }]
    ]) : regex("^(?:serviceAccount|user):(.+)$", pair.member)[0] => pair.agent_ids...
  }
  operator_emails = [
    for m in var.operator_members : lower(regex("^(?:serviceAccount|user):(.+)$", m)[0])
    if can(regex("^(?:serviceAccount|user):.+$", m))
  ]
  agent_identities = merge(
    { for email, ids in local.member_agent_ids : email => sort(distinct(flatten(ids))) },
    { for email in local.operator_emails : email => ["*"] },
  )

  # Plain environment, in groups; a function lists the groups it gets. Names are README's
  # configuration table. Credentials are never here: see local.secret_catalog.
  env = {
    base = {
      LOG_LEVEL            = var.log_level
      GOOGLE_CLOUD_PROJECT = var.project
      DB_POOL_MAX          = tostring(var.db_pool_max)
    }
    # SUPABASE_URL only in "rest" mode (with the SUPABASE_SERVICE_KEY secret).
    database = { for k, v in { SUPABASE_URL = var.supabase_url } : k => v if var.database_access == "rest" }
    tasks = {
      TASKS_LOCATION        = var.region
      TASKS_QUEUE           = google_cloud_tasks_queue.delivery.name
      DELIVER_URL           = local.deliver_url
      TASKS_SERVICE_ACCOUNT = google_service_account.tasks.email
    }
    # One sender: the messaging service wins when both are set; empty values are left out.
    twilio = { for k, v in {
      TWILIO_PHONE_NUMBER          = var.twilio_phone_number
      TWILIO_MESSAGING_SERVICE_SID = var.twilio_messaging_service_sid
    } : k => v if v != "" }
    # Twilio reports delivery to twilio_status, at its deterministic URL.
    status_callback = {
      STATUS_CALLBACK_URL = "https://${local.service_hosts.twilio_status}"
    }
    # The exact URLs Twilio calls (and signs): the webhooks check X-Twilio-Signature against them,
    # never against a URL rebuilt from the caller's X-Forwarded-Host.
    webhook_inbound = {
      TWILIO_WEBHOOK_BASE_URL = "https://${local.service_hosts.twilio_inbound}"
    }
    webhook_status = {
      TWILIO_WEBHOOK_BASE_URL = "https://${local.service_hosts.twilio_status}"
    }
    pubsub = {
      SWEEP_TOPIC   = google_pubsub_topic.sweep.name
      EVENTS_TOPIC  = google_pubsub_topic.events.name
      INBOUND_TOPIC = google_pubsub_topic.inbound.name
    }
    settings = var.settings
    # schedule_message: who the caller is comes from its verified ID token, never from the body
    # (README, "Security").
    identity = {
      CALLER_IDENTITY  = "id_token"
      AGENT_IDENTITIES = jsonencode(local.agent_identities)
    }
  }

  # Every secret the system reads. The operator creates each one (and its versions) with gcloud;
  # secrets.tf adopts them into Terraform, which holds their names, never their values.
  secret_catalog = {
    database_url = {
      secret_id = "supabase-database-url"
      env       = "DATABASE_URL"
      purpose   = "Supabase transaction-pooler URL, with password (functions)"
    }
    supabase_service_key = {
      secret_id = "supabase-service-key"
      env       = "SUPABASE_SERVICE_KEY"
      purpose   = "Supabase service-role key (functions, database_access = rest)"
    }
    migrations_database_url = {
      secret_id = "supabase-migrations-url"
      env       = ""
      purpose   = "Supabase session-pooler or direct URL for the migrations (Cloud Build only)"
    }
    twilio_account_sid = {
      secret_id = "twilio-account-sid"
      env       = "TWILIO_ACCOUNT_SID"
      purpose   = "Twilio account SID"
    }
    twilio_auth_token = {
      secret_id = "twilio-auth-token"
      env       = "TWILIO_AUTH_TOKEN"
      purpose   = "Twilio auth token"
    }
    anthropic_api_key = {
      secret_id = "anthropic-api-key"
      env       = "ANTHROPIC_API_KEY"
      purpose   = "Anthropic API key (message rendering)"
    }
  }

  unused_secrets = concat(
    var.database_access == "pooler" ? ["supabase_service_key"] : ["database_url"],
    var.anthropic_enabled ? [] : ["anthropic_api_key"],
  )
  secrets = { for k, v in local.secret_catalog : k => v if !contains(local.unused_secrets, k) }

  # The secrets each service account reads: those of the functions that run as it.
  secret_readers = merge([
    for fn, cfg in local.functions : {
      for k in cfg.secrets : "${cfg.account}/${k}" => { account = cfg.account, secret = k }
      if contains(keys(local.secrets), k) && local.secrets[k].env != ""
    }
  ]...)

  # The functions. Each entry: entry_point (the Python function in functions/main.py), the
  # service account it runs as (runtime, or webhooks for the public ones), the service name, sizing, ingress, the env groups and secrets it gets, who may invoke it (public: anyone,
  # for Twilio's webhooks only), and its event trigger (null: HTTP). Secrets a deployment does not
  # use (local.unused_secrets) are skipped. A new entry point in functions/main.py gets an entry
  # here (tests/infra/test_terraform.py fails until it has one).
  functions = {
    schedule_message = {
      entry_point     = "schedule_message"
      account         = "runtime"
      name            = local.service_names.schedule_message
      description     = "Agents schedule a message (POST) and read its status (GET /messages/<id>)."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 30
      max_instances   = var.max_instances.schedule_message
      ingress         = "ALLOW_ALL"
      env             = ["base", "database", "tasks", "pubsub", "settings", "identity"]
      secrets         = ["database_url", "supabase_service_key", "anthropic_api_key"]
      invokers        = { for m in local.schedule_invokers : m => m }
      public          = false
      trigger         = null
    }
    deliver_message = {
      entry_point     = "deliver_message"
      account         = "runtime"
      name            = local.service_names.deliver_message
      description     = "Delivers one message when its Cloud Task fires: re-checks the policy, claims, sends through Twilio."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 180 # the longest delivery: 5 parts, their Twilio calls and pauses (shared.domain)
      max_instances   = var.delivery_concurrency
      ingress         = "ALLOW_INTERNAL_ONLY"
      env             = ["base", "database", "tasks", "twilio", "status_callback", "pubsub", "settings"]
      secrets         = ["database_url", "supabase_service_key", "twilio_account_sid", "twilio_auth_token", "anthropic_api_key"]
      invokers        = { tasks = local.tasks_invoker }
      public          = false
      trigger         = null
    }
    sweep_queue = {
      entry_point     = "sweep_queue"
      account         = "runtime"
      name            = local.service_names.sweep_queue
      description     = "The safety net, every minute from the sweep topic: expiry, reconciliation with Twilio, lost and far-future tasks, events."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 120
      max_instances   = var.max_instances.sweep_queue
      ingress         = "ALLOW_INTERNAL_ONLY"
      env             = ["base", "database", "tasks", "twilio", "pubsub", "settings"]
      secrets         = ["database_url", "supabase_service_key", "twilio_account_sid", "twilio_auth_token"]
      invokers        = { scheduler = local.sweep_invoker }
      public          = false
      trigger = {
        event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
        pubsub_topic          = google_pubsub_topic.sweep.id
        service_account_email = google_service_account.scheduler.email
        retry_policy          = "RETRY_POLICY_RETRY"
      }
    }
    process_queue = {
      entry_point     = "process_queue"
      account         = "runtime"
      name            = local.service_names.process_queue
      description     = "Operators: one sweep now, answering its counts."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 120
      max_instances   = var.max_instances.process_queue
      ingress         = "ALLOW_ALL"
      env             = ["base", "database", "tasks", "twilio", "pubsub", "settings"]
      secrets         = ["database_url", "supabase_service_key", "twilio_account_sid", "twilio_auth_token"]
      invokers        = { for m in var.operator_members : m => m }
      public          = false
      trigger         = null
    }
    health = {
      entry_point     = "health"
      account         = "runtime"
      name            = local.service_names.health
      description     = "Queue statistics; 503 when the database is down or the sweep is stale."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 30
      max_instances   = var.max_instances.health
      ingress         = "ALLOW_ALL"
      env             = ["base", "database", "settings"]
      secrets         = ["database_url", "supabase_service_key"]
      invokers        = { for m in compact(concat(var.operator_members, [var.deployer_member])) : m => m }
      public          = false
      trigger         = null
    }
    # Twilio's webhooks are public: Twilio cannot present a Google identity. Each request must carry
    # X-Twilio-Signature, checked against TWILIO_AUTH_TOKEN before anything is read (shared/web.py).
    twilio_inbound = {
      entry_point     = "twilio_inbound"
      account         = "webhooks"
      name            = local.service_names.twilio_inbound
      description     = "Twilio's incoming-message webhook (signed): records replies, STOP/START/HELP, publishes inbound events."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 30
      max_instances   = var.max_instances.twilio_inbound
      ingress         = "ALLOW_ALL"
      env             = ["base", "database", "pubsub", "settings", "webhook_inbound"]
      secrets         = ["database_url", "supabase_service_key", "twilio_auth_token"]
      invokers        = {}
      public          = true
      trigger         = null
    }
    twilio_status = {
      entry_point     = "twilio_status"
      account         = "webhooks"
      name            = local.service_names.twilio_status
      description     = "Twilio's status callback (signed): delivered, undelivered and failed receipts."
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 30
      max_instances   = var.max_instances.twilio_status
      ingress         = "ALLOW_ALL"
      env             = ["base", "database", "pubsub", "settings", "webhook_status"]
      secrets         = ["database_url", "supabase_service_key", "twilio_auth_token"]
      invokers        = {}
      public          = true
      trigger         = null
    }
  }

  # (function, invoker) pairs for functions.tf; keys are known at plan time.
  invoker_bindings = merge([
    for fn, cfg in local.functions : {
      for label, member in cfg.invokers : "${fn}/${label}" => { function = fn, member = member }
    }
  ]...)
}
