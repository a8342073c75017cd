# The source bundle (built by `make bundle`) in a private bucket, and the repository the functions'
# images are built into.

resource "google_storage_bucket" "source" {
  # checkov:skip=CKV_GCP_62: holds only the code bundle (no data, no credentials), written by the deployer and read by the builds; changes are in Cloud Audit Logs. Usage logs would need a second bucket, itself without access logs.
  name                        = "${var.project}-orchestrator-source"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  # Bundles are named by content hash, so an older one stays available for a rollback; only
  # overwritten (noncurrent) versions are cleaned up.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

# One object per bundle content: a new bundle is a new object name, which makes every function
# rebuild; an unchanged bundle changes nothing.
resource "google_storage_bucket_object" "source" {
  name         = "function-source-${filemd5(local.source_archive)}.zip"
  bucket       = google_storage_bucket.source.name
  source       = local.source_archive
  content_type = "application/zip"
}

resource "google_storage_bucket_iam_member" "build_reads_source" {
  bucket = google_storage_bucket.source.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}

resource "google_artifact_registry_repository" "functions" {
  # checkov:skip=CKV_GCP_84: images hold only the code and its pinned public libraries, no data or credentials; Google-managed encryption at rest.
  repository_id = "orchestrator-functions"
  location      = var.region
  format        = "DOCKER"
  description   = "Images of the message orchestrator's functions, built by Cloud Functions."

  cleanup_policy_dry_run = false

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      older_than = "2592000s"
    }
  }
}

resource "google_artifact_registry_repository_iam_member" "build_writes_images" {
  repository = google_artifact_registry_repository.functions.name
  location   = google_artifact_registry_repository.functions.location
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}
