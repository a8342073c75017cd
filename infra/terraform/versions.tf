# Terraform and provider versions, and where the state lives.
#
# The state is in a Cloud Storage bucket the operator creates once (README, "Deploy"); its name is
# given at init time: terraform init -backend-config="bucket=<project>-tfstate".
# Terraform >= 1.7 for `import` blocks with for_each (secrets.tf).

terraform {
  required_version = ">= 1.7, < 2.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.20, < 7.0"
    }
  }

  backend "gcs" {
    prefix = "message-orchestrator"
  }
}

provider "google" {
  project = var.project
  region  = var.region

  default_labels = local.labels
}

data "google_project" "this" {
  project_id = var.project
}
