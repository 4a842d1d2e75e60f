"""The environment every container task sees, locally and in a Kubernetes pod."""

from __future__ import annotations

import json
import re

from maestro.engine.executor import AttemptContext

OUTPUTS_IN_POD = "/dev/termination-log"


def task_env(ctx: AttemptContext, outputs_path: str) -> dict[str, str]:
    """``MAESTRO_*`` variables: identity, params, upstream outputs, where to write outputs.

    ``MAESTRO_INPUTS`` holds ``{"params": ..., "tasks": {upstream: outputs}}`` as JSON,
    so a program can read everything it was given without templating.
    """
    env = {
        "MAESTRO_RUN_ID": ctx.run.id,
        "MAESTRO_RUN_NAME": ctx.run.name,
        "MAESTRO_NAMESPACE": ctx.run.namespace,
        "MAESTRO_TASK": ctx.task.name,
        "MAESTRO_ATTEMPT": str(ctx.attempt),
        "MAESTRO_OUTPUTS": outputs_path,
        "MAESTRO_INPUTS": json.dumps(
            {"params": ctx.inputs.get("params", {}), "tasks": ctx.inputs.get("tasks", {})},
            separators=(",", ":"),
        ),
    }
    for name, value in ctx.inputs.get("params", {}).items():
        env[f"MAESTRO_PARAM_{name}"] = str(value)
    # Upstream outputs too, so a shell script reads "$MAESTRO_OUTPUT_BUILD_IMAGE" instead
    # of pasting a value into its text.
    for task, outputs in ctx.inputs.get("tasks", {}).items():
        for key, value in (outputs or {}).items():
            var = env_var_name(f"MAESTRO_OUTPUT_{task}_{key}")
            env[var] = value if isinstance(value, str) else json.dumps(value)
    if "item" in ctx.inputs:
        # A fan-out instance's item: as is when a string, else JSON (read it rather
        # than pasting {{ item }} into a script).
        item = ctx.inputs["item"]
        env["MAESTRO_ITEM"] = item if isinstance(item, str) else json.dumps(item)
    outcome = ctx.inputs.get("run", {}).get("outcome")
    if outcome is not None:
        env["MAESTRO_RUN_OUTCOME"] = str(outcome)
    return env


def env_var_name(text: str) -> str:
    """Upper case, with every character a shell variable cannot hold as ``_``."""
    return re.sub(r"[^A-Z0-9_]", "_", text.upper())


def parse_outputs(text: str, *, source: str) -> tuple[dict[str, object] | None, str | None]:
    """Outputs written by a task: a JSON object, or nothing. Returns (outputs, problem)."""
    if not text.strip():
        return {}, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        snippet = text.strip()[:80]
        return None, f"outputs in {source} are not valid JSON ({err.msg}): {snippet!r}"
    if not isinstance(value, dict):
        return None, f"outputs in {source} must be a JSON object, got {type(value).__name__}"
    return value, None
