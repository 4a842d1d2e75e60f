"""Shared fixtures: a private PostgreSQL server and the local Kubernetes control plane."""

pytest_plugins = [
    "fixtures.postgres",
    "fixtures.control_plane",
    "fixtures.operator",
    "fixtures.server",
    "fixtures.health",
]
