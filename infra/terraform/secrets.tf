# Secret Manager secrets: Supabase, Twilio, Anthropic. The operator creates each secret and its
# value with gcloud (README, "Deploy"), so no value ever passes through Terraform, its plan or its
# state; Terraform adopts the secrets (import) and manages their labels and who may read them.
# Functions get them as secret environment variables (functions.tf), never as plain ones.

import {
  for_each = local.secrets
  to       = google_secret_manager_secret.secret[each.key]
  id       = "projects/${var.project}/secrets/${each.value.secret_id}"
}

resource "google_secret_manager_secret" "secret" {
  for_each = local.secrets

  secret_id = each.value.secret_id
  labels = {
    purpose = replace(lower(each.key), "_", "-")
  }
  annotations = {
    description = each.value.purpose
  }

  replication {
    auto {}
  }

  lifecycle {
    # The operator's credentials are never deleted by Terraform: not by `destroy`, not when a
    # secret leaves local.secrets (database_access or anthropic_enabled changed; then
    # `terraform state rm` it), not to change the replication it was created with.
    prevent_destroy = true
    ignore_changes  = [replication]
  }
}

# Each service account reads the secrets of the functions that run as it (the webhooks' account:
# the database and the Twilio auth token only); the migrations secret is read only by the deployer
# (Cloud Build), which has Secret Manager access of its own.
resource "google_secret_manager_secret_iam_member" "reads" {
  for_each = local.secret_readers

  secret_id = google_secret_manager_secret.secret[each.value.secret].id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value.account == "webhooks" ? google_service_account.webhooks.member : google_service_account.runtime.member
}
