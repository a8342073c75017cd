# The delivery queue: one named task per (message, generation), created by the functions
# (shared/tasks.py) for the message's planned time.

resource "google_cloud_tasks_queue" "delivery" {
  name     = var.tasks_queue_name
  location = var.region

  # Never faster than the Twilio sender accepts; never more deliveries in flight than
  # deliver_message has instances.
  rate_limits {
    max_dispatches_per_second = var.sender_throughput_per_second
    max_concurrent_dispatches = var.delivery_concurrency
  }

  # A non-2xx answer (deliver_message answers 503 when Twilio or the database is unavailable) is
  # retried with exponential backoff; once attempts run out, the sweep re-tasks the row.
  retry_config {
    max_attempts  = var.task_retry.max_attempts
    min_backoff   = var.task_retry.min_backoff
    max_backoff   = var.task_retry.max_backoff
    max_doublings = var.task_retry.max_doublings
  }

  # Whatever a task says, it is dispatched to deliver_message with an OIDC token of the tasks
  # account (the same values the functions put in each task: DELIVER_URL, TASKS_SERVICE_ACCOUNT).
  http_target {
    http_method = "POST"

    uri_override {
      scheme                    = "HTTPS"
      host                      = local.deliver_host
      uri_override_enforce_mode = "ALWAYS"
    }

    oidc_token {
      service_account_email = google_service_account.tasks.email
      audience              = local.deliver_url
    }
  }

  stackdriver_logging_config {
    sampling_ratio = var.task_log_sampling_ratio
  }
}

# The runtime may add tasks to this queue, and do nothing else with Cloud Tasks.
resource "google_cloud_tasks_queue_iam_member" "runtime_enqueues" {
  name     = google_cloud_tasks_queue.delivery.name
  location = google_cloud_tasks_queue.delivery.location
  role     = "roles/cloudtasks.enqueuer"
  member   = google_service_account.runtime.member
}
