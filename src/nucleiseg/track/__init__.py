"""MLflow: runs, artifacts and the report across runs."""
