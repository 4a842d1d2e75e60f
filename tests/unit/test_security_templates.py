"""Shell-safe templating: the shquote filter, render caps, env vars and validate's warning."""

import shlex
import subprocess
from typing import Any

import pytest

from maestro.api.models import WorkflowSpec
from maestro.dag import templates
from maestro.dag.validate import shell_warnings, validate

CTX = templates.Context(
    params={"msg": "hi; id > pwned", "big": "x" * 100_000},
    outputs={"build": {"image": "a'b $(id)", "n": 3}},
    run={"id": "r1"},
)


def test_shquote_makes_one_inert_shell_word() -> None:
    text = templates.render("echo {{ params.msg | shquote }}", CTX)
    assert text == "echo " + shlex.quote("hi; id > pwned")
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True, check=True)
    assert out.stdout == "hi; id > pwned\n"  # printed, not executed


def test_shquote_on_outputs_and_non_strings() -> None:
    assert templates.render("{{tasks.build.outputs.image|shquote}}", CTX) == "'a'\"'\"'b $(id)'"
    assert templates.render("{{ tasks.build.outputs.n | shquote }}", CTX) == "3"


def test_unknown_filter_is_an_error_naming_it() -> None:
    with pytest.raises(templates.TemplateError, match="unknown filter 'upper'"):
        list(templates.refs_in("{{ params.msg | upper }}"))


def test_render_cap_fails_with_a_clear_message() -> None:
    value = {"args": ["{{ params.big }}"] * 3}
    with pytest.raises(templates.TemplateError, match="over 262144 characters"):
        templates.render_all(value, CTX)
    assert templates.render_all({"args": ["{{ params.big }}"]}, CTX) == {"args": ["x" * 100_000]}


def spec(container: dict[str, Any]) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {
            "params": [{"name": "msg"}],
            "tasks": [
                {"name": "b", "container": {"image": "busybox"}},
                {"name": "t", "dependsOn": ["b"], "container": {"image": "busybox", **container}},
            ],
        }
    )


def test_validate_warns_on_unquoted_params_and_outputs_in_sh_c() -> None:
    s = spec(
        {
            "command": ["/bin/sh", "-c"],
            "args": ["echo {{ params.msg }} {{ tasks.b.outputs.x }} {{ run.id }}"],
        }
    )
    assert validate(s) == []  # legal: a warning, not an error
    found = [str(w) for w in shell_warnings(s)]
    assert len(found) == 2, found
    assert "{{ params.msg }} is pasted unquoted into a shell script" in found[0]
    assert "{{ params.msg | shquote }}" in found[0]
    assert "$MAESTRO_PARAM_msg" in found[0]
    assert "{{ tasks.b.outputs.x }}" in found[1]


@pytest.mark.parametrize(
    "container",
    [
        {"command": ["sh", "-c", "echo {{ params.msg | shquote }}"]},
        {"command": ["sh", "-c", 'echo "$MAESTRO_PARAM_msg"']},
        {"command": ["echo", "{{ params.msg }}"]},  # no shell: one argv word, inert
    ],
)
def test_no_warning_when_quoted_or_no_shell(container: dict[str, Any]) -> None:
    assert shell_warnings(spec(container)) == []
