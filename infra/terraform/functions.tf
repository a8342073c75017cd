# Every entry point of functions/main.py as a Cloud Functions (gen2) function, all built from the
# one source bundle; local.functions (main.tf) says what each gets.

resource "google_cloudfunctions2_function" "fn" {
  # checkov:skip=CKV_GCP_124: deliver_message and sweep_queue are ALLOW_INTERNAL_ONLY (Cloud Tasks, Eventarc); the others must be reachable from outside the project's network: by agents, operators and the deployer, who must pass IAM (roles/run.invoker), and by Twilio for the two webhooks, which check X-Twilio-Signature.
  for_each = local.functions

  name        = each.value.name
  location    = var.region
  description = each.value.description

  build_config {
    runtime           = var.python_runtime
    entry_point       = each.value.entry_point
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.functions.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email            = each.value.account == "webhooks" ? google_service_account.webhooks.email : google_service_account.runtime.email
    available_memory                 = each.value.memory
    available_cpu                    = each.value.cpu
    timeout_seconds                  = each.value.timeout_seconds
    min_instance_count               = 0
    max_instance_count               = each.value.max_instances
    max_instance_request_concurrency = 1
    ingress_settings                 = each.value.ingress
    all_traffic_on_latest_revision   = true

    environment_variables = merge([for group in each.value.env : local.env[group]]...)

    # Credentials as secret environment variables: resolved by Cloud Run when an instance starts
    # ("latest": a new version reaches the functions with their next revision or cold start).
    dynamic "secret_environment_variables" {
      for_each = [for s in each.value.secrets : s if contains(keys(local.secrets), s)]
      iterator = secret
      content {
        key        = local.secrets[secret.value].env
        project_id = data.google_project.this.number
        secret     = google_secret_manager_secret.secret[secret.value].secret_id
        version    = "latest"
      }
    }
  }

  dynamic "event_trigger" {
    for_each = each.value.trigger == null ? [] : [each.value.trigger]
    iterator = trigger
    content {
      trigger_region        = var.region
      event_type            = trigger.value.event_type
      pubsub_topic          = trigger.value.pubsub_topic
      service_account_email = trigger.value.service_account_email
      retry_policy          = trigger.value.retry_policy
    }
  }

  lifecycle {
    precondition {
      condition     = var.twilio_phone_number != "" || var.twilio_messaging_service_sid != ""
      error_message = "Set twilio_phone_number or twilio_messaging_service_sid: deliver_message needs a sender."
    }
    precondition {
      condition     = var.database_access != "rest" || startswith(var.supabase_url, "https://")
      error_message = "database_access = \"rest\" needs supabase_url (https://<ref>.supabase.co)."
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.reads,
    google_storage_bucket_iam_member.build_reads_source,
    google_artifact_registry_repository_iam_member.build_writes_images,
    google_project_iam_member.build_log_writer,
  ]
}

# Who may call which function: roles/run.invoker on the function's Cloud Run service, from
# local.functions[*].invokers only. deliver_message: the tasks account; sweep_queue: the sweep
# trigger's account; schedule_message: the agents; process_queue and health: the operators (and the
# deployer, for the smoke test of health).
resource "google_cloud_run_service_iam_member" "invoker" {
  for_each = local.invoker_bindings

  location = var.region
  service  = google_cloudfunctions2_function.fn[each.value.function].name
  role     = "roles/run.invoker"
  member   = each.value.member
}

# Twilio's webhooks answer anyone (Twilio has no Google identity); the functions themselves reject
# every request without a valid X-Twilio-Signature. No other function is public.
resource "google_cloud_run_service_iam_member" "public_webhook" {
  # checkov:skip=CKV_GCP_102: only twilio_inbound and twilio_status (local.functions[*].public): Twilio cannot present a Google identity, and each request must carry an X-Twilio-Signature valid for TWILIO_AUTH_TOKEN before anything is read or written (shared/web.py).
  for_each = { for k, f in local.functions : k => f.name if f.public }

  location = var.region
  service  = google_cloudfunctions2_function.fn[each.key].name
  role     = "roles/run.invoker"
  member   = "allUsers"
}
