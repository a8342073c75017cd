# Pub/Sub: the sweep trigger (Cloud Scheduler -> sweep topic -> Eventarc -> sweep_queue), the events
# agents read, the inbound SMS, and a dead-letter topic for what agents fail to take.

locals {
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # The topics agents read: each agent type reads each of them through its own subscription.
  agent_topics = {
    events  = google_pubsub_topic.events
    inbound = google_pubsub_topic.inbound
  }

  # What each agent type receives, as Pub/Sub filters on the messages' attributes (the functions
  # publish message.* events with agentId, inbound replies with agentType = the user's
  # poc_agent_type; migrations, mq_emit). An event whose attributes match no type's filter is
  # acknowledged by Pub/Sub on every subscription, i.e. reaches no agent.
  agent_filters = {
    events = {
      for type, a in var.agents : type => join(" OR ", [for id in a.agent_ids : "attributes.agentId = \"${id}\""])
    }
    inbound = { for type, a in var.agents : type => "attributes.agentType = \"${type}\"" }
  }

  # One subscription per (topic, agent type), keyed "<topic>/<type>".
  agent_subscriptions = merge([
    for topic, filters in local.agent_filters : {
      for type, filter in filters : "${topic}/${type}" => { topic = topic, type = type, filter = filter }
    }
  ]...)

  # Who reads which subscription: a type's members, its own subscriptions only (never another
  # type's events or its users' replies). Keyed "<topic>/<type>/<member>".
  agent_readers = merge([
    for key, sub in local.agent_subscriptions : {
      for m in distinct(var.agents[sub.type].members) : "${key}/${m}" => { subscription = key, member = m }
    }
  ]...)
}

resource "google_pubsub_topic" "sweep" {
  # checkov:skip=CKV_GCP_83: carries only a scheduler tick, no data; Google-managed encryption at rest.
  name = "orchestrator-sweep"

  # A tick nobody took within 10 minutes is worthless: the next minute brings another.
  message_retention_duration = "600s"

  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
}

resource "google_pubsub_topic" "events" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; the same message data lives in the database under its provider's keys, so a CMEK here would add a KMS dependency to every publish without changing who can read it.
  name = "orchestrator-events"

  message_retention_duration = "604800s"

  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
}

resource "google_pubsub_topic" "inbound" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; the same message data lives in the database under its provider's keys, so a CMEK here would add a KMS dependency to every publish without changing who can read it.
  name = "orchestrator-inbound"

  message_retention_duration = "604800s"

  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83: holds undelivered events/inbound messages, encrypted like those topics (Google-managed keys).
  name = "orchestrator-dead-letter"

  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
}

# The functions publish events and inbound messages (nothing publishes to the sweep topic but
# Cloud Scheduler).
resource "google_pubsub_topic_iam_member" "runtime_publishes" {
  for_each = local.agent_topics

  topic  = each.value.name
  role   = "roles/pubsub.publisher"
  member = google_service_account.runtime.member
}

resource "google_pubsub_topic_iam_member" "webhooks_publish" {
  for_each = local.agent_topics

  topic  = each.value.name
  role   = "roles/pubsub.publisher"
  member = google_service_account.webhooks.member
}

# Each agent type pulls from its own subscription per topic (orchestrator-events-<type>,
# orchestrator-inbound-<type>), so every agent type gets every event meant for it, whatever the
# other types do. A message nacked or left unacked max_delivery_attempts times goes to the
# dead-letter topic instead of being redelivered for ever.
resource "google_pubsub_subscription" "agents" {
  for_each = local.agent_subscriptions

  name                       = "${local.agent_topics[each.value.topic].name}-${each.value.type}"
  topic                      = local.agent_topics[each.value.topic].id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  # Pub/Sub cannot change a subscription's filter: a new filter (an agent id added to or removed
  # from a type) makes Terraform replace the subscription, and the messages still waiting in the old
  # one are lost. Let agents drain it first (README, "Events: one subscription per agent type").
  filter = each.value.filter

  expiration_policy {
    ttl = ""
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = 10
  }
}

# A type's members read its own subscriptions (local.agent_readers).
resource "google_pubsub_subscription_iam_member" "agents_read" {
  for_each = local.agent_readers

  subscription = google_pubsub_subscription.agents[each.value.subscription].name
  role         = "roles/pubsub.subscriber"
  member       = each.value.member
}

# Dead-lettering is done by the Pub/Sub service agent: it must publish to the dead-letter topic and
# acknowledge on the source subscriptions.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.name
  role   = "roles/pubsub.publisher"
  member = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_source" {
  for_each = local.agent_subscriptions

  subscription = google_pubsub_subscription.agents[each.key].name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}

# Dead letters are kept for a week for operators to inspect (and replay).
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "orchestrator-dead-letter-inspect"
  topic                      = google_pubsub_topic.dead_letter.id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription_iam_member" "operators_read_dead_letters" {
  for_each = toset(var.operator_members)

  subscription = google_pubsub_subscription.dead_letter.name
  role         = "roles/pubsub.subscriber"
  member       = each.value
}

# Every minute: Cloud Scheduler publishes one message to the sweep topic; Eventarc (the trigger of
# sweep_queue, functions.tf) pushes it to sweep_queue as a messagePublished CloudEvent.
resource "google_cloud_scheduler_job" "sweep" {
  name        = "orchestrator-sweep"
  region      = var.region
  description = "Ticks the message orchestrator's sweep."
  schedule    = var.sweep_schedule
  time_zone   = "Etc/UTC"

  # A missed tick is not retried: the next one comes within the schedule's interval.
  retry_config {
    retry_count = 0
  }

  pubsub_target {
    topic_name = google_pubsub_topic.sweep.id
    data       = base64encode(jsonencode({ trigger = "scheduler" }))
    attributes = {
      trigger = "scheduler"
    }
  }
}
