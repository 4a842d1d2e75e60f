"""Names that are always valid, reserved labels, static checks and API error types."""

from __future__ import annotations

import itertools
import json
import re

import aiohttp
import pytest

from maestro.api.models import WorkflowSpec
from maestro.dag.validate import validate
from maestro.executors.container import pod_name, run_label
from maestro.k8s.client import (
    APIError,
    Conflict,
    NamespaceTerminating,
    NotFound,
    PermanentAPIError,
    TransientAPIError,
    api_errors,
    status_error,
)
from maestro.operator.runs import RETRY_MAX_SECONDS, event_name, retry_delay

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def run_names() -> list[str]:
    """Valid WorkflowRun names that cut badly: '-' or '.' wherever a cut may fall."""
    names = ["r", "a" * 253, "a.b", "x" * 62 + "-y", "x" * 63 + "-y" * 20]
    for pos in range(40, 70):
        for ch in "-.":
            names.append("a" * pos + ch + "b" * 20)
            names.append("a" * (pos - 1) + ch + ch + "b" * 200)  # "--" is valid; ".." is not
    return [n for n in names if DNS_SUBDOMAIN.match(n) and len(n) <= 253]


def test_pod_names_are_dns_labels_and_unique() -> None:
    tasks = ["t", "a" * 63, "build-", "x-1"]
    tasks = [t for t in tasks if DNS_LABEL.match(t)]
    seen: dict[str, tuple[str, str, int]] = {}
    for run, task, attempt in itertools.product(run_names(), tasks, (1, 2, 100)):
        name = pod_name(run, task, attempt)
        assert DNS_LABEL.match(name), (run, task, name)
        assert len(name) <= 63, (run, task, name)
        assert seen.setdefault(name, (run, task, attempt)) == (run, task, attempt)


def test_the_issue_cases_give_valid_names() -> None:
    dash_at_63 = "a" * 62 + "-" + "b" * 5
    dot_at_cut = "a" * 51 + "." + "b" * 30
    for run in (dash_at_63, dot_at_cut):
        assert DNS_LABEL.match(pod_name(run, "t", 1))
        assert LABEL_VALUE.match(run_label(run))
        assert len(run_label(run)) <= 63
    assert pod_name("short", "t", 1) == "short-t-1"  # readable when it fits


def test_run_labels_are_valid_label_values() -> None:
    for run in run_names():
        label = run_label(run)
        assert LABEL_VALUE.match(label), run
        assert len(label) <= 63, run
    assert run_label("short.name") == "short.name"


def spec(task: dict[str, object]) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"tasks": [{"name": "t", **task}]})


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"http": {"url": "http://[::1"}}, "http.url: 'http://[::1' is not a valid URL"),
        ({"http": {"url": "ftp://h/"}}, "must start with http:// or https://"),
        ({"http": {"url": "http://h:x/"}}, "http.url"),
        (
            {"http": {"url": "http://h/", "headers": [{"name": "A", "value": "é"}]}},
            "http.headers['A']: value has characters other than printable ASCII",
        ),
        ({"container": {"image": " "}}, "container.image: is empty"),
        (
            {"container": {"image": "i", "podMetadata": {"labels": {"job-name": "x"}}}},
            "labels['job-name']: is reserved",
        ),
        (
            {"container": {"image": "i", "podMetadata": {"labels": {"maestro.dev/run": "x"}}}},
            "labels['maestro.dev/run']: is reserved",
        ),
        (
            {"container": {"image": "i", "podMetadata": {"labels": {"ok": "-bad"}}}},
            "is not a valid label value",
        ),
    ],
)
def test_validate_catches_what_is_known_statically(task: dict[str, object], expected: str) -> None:
    problems = [str(p) for p in validate(spec(task))]
    assert any(p.startswith("t: ") and expected in p for p in problems), problems


def test_templated_fields_are_left_to_render_time() -> None:
    task = {
        "http": {"url": "{{ params.u }}", "headers": [{"name": "A", "value": "{{ params.u }}"}]}
    }
    wf = WorkflowSpec.model_validate({"params": [{"name": "u"}], "tasks": [{"name": "t", **task}]})
    assert validate(wf) == []


def api_error(status: int, body: dict[str, object] | None = None) -> APIError:
    return status_error("x", status, "Reason", json.dumps(body or {}).encode())


def test_api_errors_are_typed_with_the_apis_own_message() -> None:
    invalid = status_error(
        "job x",
        422,
        "Unprocessable Entity",
        json.dumps({"message": 'Job.batch "x" is invalid: name', "reason": "Invalid"}).encode(),
    )
    assert isinstance(invalid, PermanentAPIError)
    assert not isinstance(invalid, TransientAPIError)
    assert (invalid.status, invalid.reason) == (422, "Invalid")
    assert invalid.message == 'Job.batch "x" is invalid: name'
    assert str(invalid) == 'job x: Job.batch "x" is invalid: name'
    assert isinstance(api_error(403), PermanentAPIError)
    assert isinstance(api_error(404), NotFound)
    assert isinstance(api_error(409), Conflict)
    for status in (429, 500, 503, 504):
        assert isinstance(api_error(status), TransientAPIError)
    terminating = {"details": {"causes": [{"reason": "NamespaceTerminating"}]}}
    assert isinstance(api_error(403, terminating), NamespaceTerminating)
    # A body that is not a Status (a proxy's HTML page): the HTTP reason speaks.
    garbled = status_error("x", 502, "Bad Gateway", b"<html>")
    assert isinstance(garbled, TransientAPIError)
    assert garbled.message == "Bad Gateway"


@pytest.mark.parametrize(
    "err", [aiohttp.ClientConnectionError("connection refused"), TimeoutError(), ConnectionError()]
)
def test_a_request_without_an_answer_is_transient(err: Exception) -> None:
    with pytest.raises(TransientAPIError) as caught, api_errors("pod p"):
        raise err
    assert caught.value.what == "pod p"
    assert caught.value.status is None


def test_other_errors_are_not_api_errors() -> None:
    with pytest.raises(ValueError, match="not an API error"), api_errors("x"):
        raise ValueError("not an API error")


def test_retry_delays_are_seconds_and_capped() -> None:
    delays = [retry_delay(n) for n in range(1, 20)]
    assert delays[0] < 1
    assert delays == sorted(delays)
    assert max(delays) == RETRY_MAX_SECONDS <= 10


def test_event_names_are_valid_and_distinct_per_store_event() -> None:
    from datetime import UTC, datetime

    from maestro.api.phases import RunPhase
    from maestro.store import RunRecord

    now = datetime.now(UTC)
    run = RunRecord(
        id="0123abcd-0000-0000-0000-000000000000", namespace="n", name="a" * 250 + ".b",
        uid=None, workflow_name=None, spec={}, params={}, phase=RunPhase.RUNNING, reason=None,
        message=None, controls={}, generation=1, created_at=now, started_at=now,
        finished_at=None, updated_at=now,
    )  # fmt: skip
    names = {event_name(run, i) for i in (1, 2, 3)}
    assert len(names) == 3
    assert all(DNS_SUBDOMAIN.match(n) and len(n) <= 253 for n in names)
