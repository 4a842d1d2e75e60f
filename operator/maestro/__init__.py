"""Maestro: a Kubernetes operator that runs DAG workflows, with run state in PostgreSQL."""

__version__ = "0.1.0"
