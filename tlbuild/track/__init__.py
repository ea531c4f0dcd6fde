"""Experiment tracking: each build logged as an MLflow run (`[track]`, the mlflow extra)."""
