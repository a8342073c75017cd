# Inputs. Only `project`, `agents` and one Twilio sender are required; everything else has a
# default that suits one Twilio long code. See terraform.tfvars.example.

variable "project" {
  description = "Google Cloud project id to deploy into."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project))
    error_message = "project must be a Google Cloud project id (6-30 lowercase letters, digits, hyphens)."
  }
}

variable "region" {
  description = "Region of the functions, the Cloud Tasks queue, the scheduler job and the buckets."
  type        = string
  default     = "us-central1"
}

# --- delivery pacing -------------------------------------------------------------------------------

variable "sender_throughput_per_second" {
  description = "Messages per second the Twilio sender accepts (a US long code: 1, toll-free: 3, short code: 100). The delivery queue never dispatches faster."
  type        = number
  default     = 1

  validation {
    condition     = var.sender_throughput_per_second > 0 && var.sender_throughput_per_second <= 500
    error_message = "sender_throughput_per_second must be in (0, 500] (Cloud Tasks' per-queue limit)."
  }
}

variable "delivery_concurrency" {
  description = "Deliveries in flight at once: the queue's max_concurrent_dispatches and deliver_message's max instances (one request per instance)."
  type        = number
  default     = 10

  validation {
    condition     = var.delivery_concurrency >= 1 && var.delivery_concurrency <= 1000
    error_message = "delivery_concurrency must be between 1 and 1000."
  }
}

variable "task_retry" {
  description = "Cloud Tasks retry policy for a delivery task that answered non-2xx (503: Twilio or the database is unavailable). After the last attempt the sweep re-tasks the row."
  type = object({
    max_attempts  = optional(number, 10)
    min_backoff   = optional(string, "10s")
    max_backoff   = optional(string, "600s")
    max_doublings = optional(number, 5)
  })
  default = {}

  validation {
    condition     = var.task_retry.max_attempts >= 1 && var.task_retry.max_doublings >= 0
    error_message = "task_retry.max_attempts must be >= 1 and max_doublings >= 0."
  }
}

variable "tasks_queue_name" {
  description = "Name of the Cloud Tasks queue (a deleted queue's name is reserved for 7 days)."
  type        = string
  default     = "message-delivery"
}

variable "task_log_sampling_ratio" {
  description = "Fraction of Cloud Tasks dispatch attempts written to Cloud Logging."
  type        = number
  default     = 0.1

  validation {
    condition     = var.task_log_sampling_ratio >= 0 && var.task_log_sampling_ratio <= 1
    error_message = "task_log_sampling_ratio must be in [0, 1]."
  }
}

# --- the sweep -------------------------------------------------------------------------------------

variable "sweep_schedule" {
  description = "Cron schedule (UTC) of the Cloud Scheduler job that publishes to the sweep topic."
  type        = string
  default     = "* * * * *"

  validation {
    condition     = length(split(" ", trimspace(var.sweep_schedule))) == 5
    error_message = "sweep_schedule must be a five-field cron expression, e.g. \"* * * * *\"."
  }
}

# --- who may call --------------------------------------------------------------------------------

variable "agents" {
  description = <<-EOT
    The agents, by agent type (the users' poc_agent_type: an inbound reply goes to the type of its
    user). Per type: members, the IAM members (serviceAccount: or user:) that may call
    schedule_message and read that type's events and inbound subscriptions; agent_ids, the agentId
    values they may act as (AGENT_IDENTITIES of schedule_message), whose message.* events the type's
    events subscription receives. E.g.
    { concierge = { members = ["serviceAccount:concierge@agents-prod.iam.gserviceaccount.com"], agent_ids = ["concierge", "concierge-reminders"] } }.
  EOT
  type = map(object({
    members   = list(string)
    agent_ids = list(string)
  }))

  validation {
    condition     = length(var.agents) > 0
    error_message = "agents must name at least one agent type."
  }

  # The type is part of resource names (orchestrator-events-<type>) and of a Pub/Sub filter literal.
  validation {
    condition     = alltrue([for t in keys(var.agents) : can(regex("^[a-z][a-z0-9_-]{0,39}$", t))])
    error_message = "agents' keys (agent types) must be 1-40 characters: a lowercase letter, then lowercase letters, digits, _ or -."
  }

  # Only identities whose Google ID token carries their email: the function maps that email to agent
  # ids (AGENT_IDENTITIES). Never allUsers, allAuthenticatedUsers, groups, domains or principal sets:
  # their tokens carry no email to bind to agent ids. Lowercase, as the token's email claim is.
  validation {
    condition = alltrue(flatten([
      for a in values(var.agents) : [for m in a.members : can(regex("^(serviceAccount|user):[^@:\\sA-Z]+@[^@:\\sA-Z]+$", m))]
    ]))
    error_message = "agents[*].members must be serviceAccount:EMAIL or user:EMAIL, the email in lowercase as Google issues it in ID tokens; never allUsers, allAuthenticatedUsers, group:, domain: or principal sets (their ID token carries no email to bind to agent ids)."
  }

  validation {
    condition     = alltrue([for a in values(var.agents) : length(a.members) > 0])
    error_message = "every agent type needs at least one member (otherwise nobody may read its subscriptions)."
  }

  validation {
    condition     = alltrue([for a in values(var.agents) : length(a.agent_ids) > 0])
    error_message = "every agent type needs at least one agent id."
  }

  # Agent ids go into the body's agentId (at most 100 characters) and into a Pub/Sub filter literal;
  # "*" is reserved (AGENT_IDENTITIES: any agent).
  validation {
    condition = alltrue(flatten([
      for a in values(var.agents) : [for id in a.agent_ids : can(regex("^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$", id))]
    ]))
    error_message = "agent ids must be 1-100 characters: a letter or digit, then letters, digits, _ . : or -."
  }

  validation {
    condition = length(flatten([for a in values(var.agents) : a.agent_ids])) == length(distinct(flatten([
      for a in values(var.agents) : a.agent_ids
    ])))
    error_message = "an agent id may appear only once, under one agent type (its events go to that type's subscription)."
  }

  # A Pub/Sub filter is at most 256 bytes (pubsub.tf builds one per type from its agent ids).
  validation {
    condition = alltrue([
      for a in values(var.agents) : length(join(" OR ", [for id in a.agent_ids : "attributes.agentId = \"${id}\""])) <= 256
    ])
    error_message = "too many or too long agent ids under one type: its events filter (attributes.agentId = \"...\" OR ...) must fit Pub/Sub's 256 bytes. Split the type."
  }
}

variable "operator_members" {
  description = "IAM members allowed to call process_queue and health, to read the dead-letter subscription, and to call schedule_message as any agent (a serviceAccount: or user: operator is AGENT_IDENTITIES \"*\"; a group's members are not known by email and act as no agent)."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for m in var.operator_members : can(regex("^(serviceAccount|group|user|principal|principalSet):", m))
    ])
    error_message = "operator_members are IAM members (serviceAccount:, group:, user:, principal:, principalSet:)."
  }
}

variable "deployer_member" {
  description = "The identity that runs the deployment (Cloud Build passes serviceAccount:$SERVICE_ACCOUNT_EMAIL); it may call health, for the smoke test. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.deployer_member == "" || can(regex("^(serviceAccount|user|group):", var.deployer_member))
    error_message = "deployer_member must be empty or an IAM member (serviceAccount:, user:, group:)."
  }
}

# --- the database and the outside services ---------------------------------------------------------

variable "database_access" {
  description = "\"pooler\": DATABASE_URL from the supabase-database-url secret (Supabase's transaction pooler); \"rest\": SUPABASE_URL plus SUPABASE_SERVICE_KEY from the supabase-service-key secret."
  type        = string
  default     = "pooler"

  validation {
    condition     = contains(["pooler", "rest"], var.database_access)
    error_message = "database_access must be \"pooler\" or \"rest\"."
  }
}

variable "supabase_url" {
  description = "https://<ref>.supabase.co; required when database_access = \"rest\" (not a secret)."
  type        = string
  default     = ""
}

variable "twilio_phone_number" {
  description = "The sending number (E.164), unless twilio_messaging_service_sid is set."
  type        = string
  default     = ""
}

variable "twilio_messaging_service_sid" {
  description = "A Twilio Messaging Service (MG...) to send through; wins over twilio_phone_number."
  type        = string
  default     = ""
}

variable "anthropic_enabled" {
  description = "Give schedule_message and deliver_message ANTHROPIC_API_KEY from the anthropic-api-key secret (structured messages rendered with Claude). false: the deterministic template renderer only, and no such secret is needed."
  type        = bool
  default     = false
}

variable "settings" {
  description = "Tuning from README's configuration table (policy defaults, sweep and health timings), as environment variables for every function, e.g. { DAILY_LIMIT = \"8\" }."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([for k in keys(var.settings) : contains([
      "COOLDOWN_SECONDS", "HOURLY_LIMIT", "DAILY_LIMIT", "QUIET_HOURS_START", "QUIET_HOURS_END",
      "ACTIVE_WINDOW_MINUTES", "LOW_PRIORITY_DAILY_RESERVE", "MAX_ATTEMPTS", "CLAIM_LEASE_SECONDS",
      "MAX_CONTENT_LENGTH", "RECONCILE_AFTER_SECONDS", "SWEEP_GRACE_SECONDS", "SWEEP_BATCH_SIZE",
      "SWEEP_TIME_BUDGET_SECONDS", "HEALTH_STALE_SECONDS", "TWILIO_TIMEOUT_SECONDS",
      "SWEEP_TASK_CONCURRENCY", "WEEKLY_LIMIT", "ACCOUNT_RATE_PER_SECOND", "ACCOUNT_HOURLY_LIMIT", "ACCOUNT_DAILY_LIMIT",
      "ANTHROPIC_MODEL", "ANTHROPIC_TIMEOUT_SECONDS", "RENDER_MAX_LENGTH",
      "USER_QUEUE_LIMIT", "AGENT_RATE_PER_MINUTE", "COMPLIANCE_PROFILE", "URGENT_AGENTS",
      "STOP_REPLY", "START_REPLY", "HELP_REPLY",
      "MAX_SEGMENTS_PER_MESSAGE", "SMART_ENCODING", "ACCOUNT_CAPS_UNIT",
    ], k)])
    error_message = "settings may only hold the tuning variables of README's configuration table; credentials go to Secret Manager, wiring is set here."
  }
}

variable "log_level" {
  description = "LOG_LEVEL of every function."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "db_pool_max" {
  description = "DB_POOL_MAX: database connections per instance. Every instance takes up to this many from the Supabase pooler."
  type        = number
  default     = 2
}

# --- functions -------------------------------------------------------------------------------------

variable "python_runtime" {
  description = "Cloud Functions runtime; the bundle's requirements.txt is pinned from a Python of the same minor version."
  type        = string
  default     = "python311"
}

variable "source_archive" {
  description = "Path of the bundle built by `make bundle`. Empty: dist/function-source.zip at the repository root."
  type        = string
  default     = ""
}

variable "max_instances" {
  description = "Max instances per function (deliver_message follows delivery_concurrency)."
  type = object({
    schedule_message = optional(number, 20)
    sweep_queue      = optional(number, 2)
    process_queue    = optional(number, 1)
    health           = optional(number, 2)
    twilio_inbound   = optional(number, 10)
    twilio_status    = optional(number, 10)
  })
  default = {}
}

# --- alerting --------------------------------------------------------------------------------------

variable "alert_email" {
  description = "An e-mail address that receives the alerts. Empty: none (use alert_notification_channels)."
  type        = string
  default     = ""
}

variable "alert_notification_channels" {
  description = "Existing Cloud Monitoring notification channel ids for the alerts."
  type        = list(string)
  default     = []
}

variable "failure_rate_threshold" {
  description = "Alert when failed / (sent + failed) over 15 minutes exceeds this."
  type        = number
  default     = 0.1
}

variable "overdue_alert_threshold" {
  description = "Alert when a sweep finds more queued messages overdue (their task lost) than this, for 15 minutes."
  type        = number
  default     = 10
}

variable "sweep_stale_seconds" {
  description = "Alert when no sweep has finished without error for this long (health answers 503 sweep_stale after HEALTH_STALE_SECONDS)."
  type        = number
  default     = 300

  validation {
    condition     = var.sweep_stale_seconds >= 120
    error_message = "sweep_stale_seconds must be >= 120 (the shortest absence window of Cloud Monitoring)."
  }
}
