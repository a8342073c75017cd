# Service accounts, each with only what its job needs. Grants sit on the resource they are about
# (the queue, a secret, a topic, a bucket, one function), not on the project, except log writing.
#
#   runtime    the functions but the webhooks run as it: creates tasks, reads their secrets,
#              publishes events
#   webhooks   Twilio's public webhooks run as it: reads the database and Twilio auth token secrets
#              and publishes events, nothing else (no tasks, no task identity, no Anthropic key)
#   tasks      the identity in the tasks' OIDC token: may invoke deliver_message, nothing else
#   scheduler  the identity of the sweep's Eventarc trigger: may invoke sweep_queue, nothing else
#              (Cloud Scheduler itself publishes to the sweep topic as its service agent)
#   build      Cloud Build runs the functions' builds as it: reads the bundle, pushes the image

resource "google_service_account" "runtime" {
  account_id   = "orchestrator-runtime"
  display_name = "Message orchestrator: functions runtime"
  description  = "Runs every function; creates delivery tasks, reads the functions' secrets, publishes events."
}

resource "google_service_account" "webhooks" {
  account_id   = "orchestrator-webhooks"
  display_name = "Message orchestrator: Twilio webhooks"
  description  = "Runs twilio_inbound and twilio_status, the public functions: reads their secrets, publishes events."
}

resource "google_service_account" "tasks" {
  account_id   = "orchestrator-tasks"
  display_name = "Message orchestrator: Cloud Tasks invoker"
  description  = "The OIDC identity of the delivery tasks; the only invoker of deliver_message."
}

resource "google_service_account" "scheduler" {
  account_id   = "orchestrator-scheduler"
  display_name = "Message orchestrator: scheduled sweep"
  description  = "Identity of the Eventarc trigger from the sweep topic; the only invoker of sweep_queue."
}

resource "google_service_account" "build" {
  account_id   = "orchestrator-build"
  display_name = "Message orchestrator: function builds"
  description  = "Builds the functions' images from the source bundle."
}

# Structured logs to Cloud Logging (the log-based metrics and alerts read them).
resource "google_project_iam_member" "runtime_log_writer" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.runtime.member
}

resource "google_project_iam_member" "webhooks_log_writer" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.webhooks.member
}

resource "google_project_iam_member" "build_log_writer" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}

# Creating a task whose OIDC token is minted for the tasks account requires actAs on that account
# (and only that one): the runtime may hand out the tasks identity, and so reach deliver_message,
# but no other identity.
resource "google_service_account_iam_member" "runtime_acts_as_tasks" {
  service_account_id = google_service_account.tasks.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.runtime.member
}
