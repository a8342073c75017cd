# Log-based metrics from the functions' structured JSON logs (shared/log.py: one JSON object per line,
# which Cloud Logging keeps as jsonPayload), three alert policies and one dashboard.
#
# What the filters rely on (tests/infra/test_terraform.py checks the code still logs it):
#   deliver_message logs every outcome with jsonPayload.action (sent, deferred, failed, skipped,
#   expired, retry, reconciled) and jsonPayload.reason; a reconciliation with Twilio logs a message
#   starting "reconciled: "; every sweep ends with "sweep finished" and its counts
#   (jsonPayload.overdue_requeued, ...) and, when it failed, jsonPayload.error.

locals {
  log_base    = "resource.type=\"cloud_run_revision\""
  deliver_log = "${local.log_base} AND resource.labels.service_name=\"${local.service_names.deliver_message}\""
  sweep_log = join(" ", [
    local.log_base,
    "AND resource.labels.service_name=(\"${local.service_names.sweep_queue}\" OR \"${local.service_names.process_queue}\")",
    "AND jsonPayload.message=\"sweep finished\"",
  ])
  reconcile_log = join(" ", [
    local.log_base,
    "AND resource.labels.service_name=(\"${local.service_names.deliver_message}\" OR \"${local.service_names.sweep_queue}\" OR \"${local.service_names.process_queue}\")",
    "AND jsonPayload.message=~\"^reconciled: \"",
  ])

  notification_channels = concat(
    var.alert_notification_channels,
    [for c in google_monitoring_notification_channel.email : c.id],
  )

  metric_prefix = "logging.googleapis.com/user"
}

resource "google_logging_metric" "sent" {
  name        = "orchestrator/messages_sent"
  description = "Messages Twilio accepted (deliver_message action=sent)."
  filter      = "${local.deliver_log} AND jsonPayload.action=\"sent\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Messages sent"
  }
}

resource "google_logging_metric" "failed" {
  name        = "orchestrator/messages_failed"
  description = "Messages failed for good (permanent Twilio error, opt-out, attempts exhausted), by reason."
  filter      = "${local.deliver_log} AND jsonPayload.action=\"failed\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Messages failed"
    labels {
      key         = "reason"
      value_type  = "STRING"
      description = "Why it failed (e.g. opted_out, twilio_21211, attempts_exhausted)."
    }
  }

  label_extractors = {
    reason = "EXTRACT(jsonPayload.reason)"
  }
}

resource "google_logging_metric" "deferred" {
  name        = "orchestrator/messages_deferred"
  description = "Deliveries the policy moved to a later time, by reason (cooldown, hourly_limit, daily_limit, quiet_hours, ...)."
  filter      = "${local.deliver_log} AND jsonPayload.action=\"deferred\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Messages deferred"
    labels {
      key         = "reason"
      value_type  = "STRING"
      description = "The policy's reason."
    }
  }

  label_extractors = {
    reason = "EXTRACT(jsonPayload.reason)"
  }
}

resource "google_logging_metric" "reconciled" {
  name        = "orchestrator/messages_reconciled"
  description = "Sends of unknown outcome settled with Twilio's record: recorded (Twilio had it) or queued again."
  filter      = local.reconcile_log

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Messages reconciled"
    labels {
      key         = "outcome"
      value_type  = "STRING"
      description = "recorded | queued again"
    }
  }

  label_extractors = {
    outcome = "REGEXP_EXTRACT(jsonPayload.message, \"; (recorded|queued again)$\")"
  }
}

# The denominator of the failure rate: every delivery that ended, sent or failed.
resource "google_logging_metric" "finished" {
  name        = "orchestrator/deliveries_finished"
  description = "Deliveries that ended (action sent or failed), by action."
  filter      = "${local.deliver_log} AND jsonPayload.action=(\"sent\" OR \"failed\")"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Deliveries finished"
    labels {
      key        = "action"
      value_type = "STRING"
    }
  }

  label_extractors = {
    action = "EXTRACT(jsonPayload.action)"
  }
}

resource "google_logging_metric" "sweeps" {
  name        = "orchestrator/sweeps_completed"
  description = "Sweeps that finished without error (scheduled or process_queue)."
  filter      = "${local.sweep_log} AND NOT jsonPayload.error:*"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "Sweeps completed"
  }
}

resource "google_logging_metric" "overdue" {
  name            = "orchestrator/sweep_overdue_requeued"
  description     = "Queued messages a sweep found overdue (their task lost or still waiting) and re-tasked, per sweep."
  filter          = local.sweep_log
  value_extractor = "EXTRACT(jsonPayload.overdue_requeued)"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "1"
    display_name = "Overdue messages per sweep"
  }

  bucket_options {
    exponential_buckets {
      num_finite_buckets = 16
      growth_factor      = 2
      scale              = 1
    }
  }
}

resource "google_monitoring_notification_channel" "email" {
  count = var.alert_email == "" ? 0 : 1

  display_name = "Message orchestrator alerts"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }
}

resource "google_monitoring_alert_policy" "failure_rate" {
  display_name          = "Message orchestrator: delivery failure rate"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = local.notification_channels

  conditions {
    display_name = "failed / (sent + failed) over 15 min > ${var.failure_rate_threshold}"
    condition_threshold {
      filter             = "metric.type=\"${local.metric_prefix}/${google_logging_metric.failed.name}\" AND resource.type=\"cloud_run_revision\""
      denominator_filter = "metric.type=\"${local.metric_prefix}/${google_logging_metric.finished.name}\" AND resource.type=\"cloud_run_revision\""
      comparison         = "COMPARISON_GT"
      threshold_value    = var.failure_rate_threshold
      duration           = "0s"

      aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "More than ${var.failure_rate_threshold * 100}% of the deliveries that ended in the last 15 minutes failed. See the `reason` label of ${google_logging_metric.failed.name}: Twilio error codes (21211 invalid number, 21610 opted out, 21408 region), or `attempts_exhausted` when Twilio keeps failing."
  }
}

resource "google_monitoring_alert_policy" "overdue_backlog" {
  display_name          = "Message orchestrator: overdue backlog"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = local.notification_channels

  conditions {
    display_name = "sweeps keep finding > ${var.overdue_alert_threshold} overdue messages for 15 min"
    condition_threshold {
      filter          = "metric.type=\"${local.metric_prefix}/${google_logging_metric.overdue.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.overdue_alert_threshold
      duration        = "900s"

      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_PERCENTILE_99"
        cross_series_reducer = "REDUCE_MAX"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Queued messages are due but not being delivered: each sweep re-tasks many overdue rows. Check the Cloud Tasks queue (paused? rate too low for the load?), deliver_message's errors and instance limit, and Twilio."
  }
}

resource "google_monitoring_alert_policy" "sweep_stale" {
  display_name          = "Message orchestrator: sweep stale"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = local.notification_channels

  conditions {
    display_name = "no sweep finished without error for ${var.sweep_stale_seconds}s"
    condition_absent {
      filter   = "metric.type=\"${local.metric_prefix}/${google_logging_metric.sweeps.name}\" AND resource.type=\"cloud_run_revision\""
      duration = "${var.sweep_stale_seconds}s"

      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The safety net is not running: lost tasks are not recreated, stale claims not reconciled, expiries not applied. Check the Cloud Scheduler job (paused?), the sweep topic's Eventarc trigger, sweep_queue's logs (`sweep finished` with `error`: the database is unreachable) and the health function."
  }
}

resource "google_monitoring_dashboard" "orchestrator" {
  dashboard_json = jsonencode({
    displayName = "Message orchestrator"
    mosaicLayout = {
      columns = 12
      tiles = [
        for i, tile in [
          { title = "Messages sent", metric = google_logging_metric.sent.name, group_by = [], aligner = "ALIGN_SUM", reducer = "REDUCE_SUM" },
          { title = "Messages failed, by reason", metric = google_logging_metric.failed.name, group_by = ["metric.label.reason"], aligner = "ALIGN_SUM", reducer = "REDUCE_SUM" },
          { title = "Messages deferred, by reason", metric = google_logging_metric.deferred.name, group_by = ["metric.label.reason"], aligner = "ALIGN_SUM", reducer = "REDUCE_SUM" },
          { title = "Messages reconciled, by outcome", metric = google_logging_metric.reconciled.name, group_by = ["metric.label.outcome"], aligner = "ALIGN_SUM", reducer = "REDUCE_SUM" },
          { title = "Sweeps completed", metric = google_logging_metric.sweeps.name, group_by = [], aligner = "ALIGN_SUM", reducer = "REDUCE_SUM" },
          { title = "Overdue messages per sweep (p99)", metric = google_logging_metric.overdue.name, group_by = [], aligner = "ALIGN_PERCENTILE_99", reducer = "REDUCE_MAX" },
          ] : {
          xPos   = (i % 2) * 6
          yPos   = floor(i / 2) * 4
          width  = 6
          height = 4
          widget = {
            title = tile.title
            xyChart = {
              dataSets = [{
                plotType = "LINE"
                timeSeriesQuery = {
                  timeSeriesFilter = {
                    filter = "metric.type=\"${local.metric_prefix}/${tile.metric}\" AND resource.type=\"cloud_run_revision\""
                    aggregation = {
                      alignmentPeriod    = "300s"
                      perSeriesAligner   = tile.aligner
                      crossSeriesReducer = tile.reducer
                      groupByFields      = tile.group_by
                    }
                  }
                }
              }]
            }
          }
        }
      ]
    }
  })
}
