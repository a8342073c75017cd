output "function_urls" {
  description = "Each function's HTTPS URL (Cloud Run), by entry point. Callers send an ID token whose audience is this URL."
  value       = { for k, f in google_cloudfunctions2_function.fn : k => f.service_config[0].uri }
}

output "schedule_url" {
  description = "Where agents POST messages (SCHEDULE_URL in README's examples)."
  value       = google_cloudfunctions2_function.fn["schedule_message"].service_config[0].uri
}

output "health_url" {
  description = "The health function, for the smoke test and operators."
  value       = google_cloudfunctions2_function.fn["health"].service_config[0].uri
}

output "twilio_webhook_urls" {
  description = "Set in Twilio: the number's \"A message comes in\" webhook (inbound); deliver_message passes the status callback itself."
  value = {
    inbound = local.env.webhook_inbound.TWILIO_WEBHOOK_BASE_URL
    status  = local.env.status_callback.STATUS_CALLBACK_URL
  }
}

output "deliver_url" {
  description = "DELIVER_URL: deliver_message's deterministic URL, which the tasks call (with the tasks account's OIDC token)."
  value       = local.deliver_url
}

output "queue_name" {
  description = "The Cloud Tasks queue (TASKS_QUEUE) and its full path."
  value       = google_cloud_tasks_queue.delivery.name
}

output "queue_path" {
  description = "projects/P/locations/L/queues/Q of the delivery queue."
  value       = "projects/${var.project}/locations/${var.region}/queues/${google_cloud_tasks_queue.delivery.name}"
}

output "service_accounts" {
  description = "The service accounts, by role."
  value = {
    runtime   = google_service_account.runtime.email
    tasks     = google_service_account.tasks.email
    scheduler = google_service_account.scheduler.email
    build     = google_service_account.build.email
  }
}

output "topics" {
  description = "Pub/Sub topics, and each agent type's subscriptions: subscriptions.<type>.events and .inbound."
  value = {
    sweep       = google_pubsub_topic.sweep.name
    events      = google_pubsub_topic.events.name
    inbound     = google_pubsub_topic.inbound.name
    dead_letter = google_pubsub_topic.dead_letter.name
    subscriptions = {
      for type in keys(var.agents) : type => {
        for topic in keys(local.agent_topics) : topic => google_pubsub_subscription.agents["${topic}/${type}"].name
      }
    }
  }
}

output "agent_identities" {
  description = "AGENT_IDENTITIES of schedule_message: each caller's email and the agent ids it may act as (\"*\": any)."
  value       = local.agent_identities
}
