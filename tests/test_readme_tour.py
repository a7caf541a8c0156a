"""The README's commands work as written (issue #12 item 15).

The tour's Context-7 lines are run by bash, with curl, against a live gateway: the second
turn must continue the session the first one returned. ``./run manage`` runs management
commands from any directory without an activated virtualenv.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from sessions_ctx7.models import Message, Session

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def tour_commands() -> list[str]:
    """The tour's shell lines, continuation lines joined, comments left to bash."""
    block = README.split("## A 60-second tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    joined = re.sub(r"\|\n\s*", "| ", joined)  # a pipe continued on the next line
    return [line for line in joined.splitlines() if line.strip()]


def context7_lines() -> list[str]:
    lines = tour_commands()
    first = next(i for i, line in enumerate(lines) if "/vx11/route/chat" in line)
    last = next(i for i, line in enumerate(lines) if "/vx11/context-7/sessions" in line)
    return lines[first : last + 1]


def test_the_tours_second_turn_continues_the_session_the_first_returned(
    http, upstream, operator_headers
):
    upstream.respond("POST", "/switch/route-v5", body={"response": "hello from switch"})
    script = "\n".join(["set -euo pipefail", *context7_lines()]).replace(
        "localhost:8000", http.base_url.__str__().rstrip("/").removeprefix("http://")
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "H": f"X-VX11-Token: {operator_headers['X-VX11-Token']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # The tour's one-off first call and the two-turn conversation: two sessions.
    assert Session.objects.count() == 2
    conversation = Session.objects.get(message_count=4)
    assert list(
        Message.objects.filter(session=conversation).order_by("seq").values_list("role", "content")
    ) == [
        ("user", "hello"),
        ("assistant", "hello from switch"),
        ("user", "and again"),
        ("assistant", "hello from switch"),
    ]
    second = upstream.seen[-1].json()  # the second turn went up with the first in its summary
    assert second["session_id"] == conversation.session_id
    assert second["metadata"]["context_summary"].startswith("user: hello\n")
    # The last command printed the conversation.
    assert conversation.session_id in done.stdout and '"and again"' in done.stdout


def test_the_readme_runs_management_commands_through_the_run_script():
    assert "python manage.py create_api_client" not in README
    assert "./run manage create_api_client my-app" in README
    shown = re.findall(r"^(?!.*virtualenv).*python manage\.py .*$", README, flags=re.M)
    assert [line for line in shown if "activated" not in line] == []


def test_run_manage_works_from_anywhere_without_an_activated_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run(
        [str(ROOT / "run"), "manage", "help", "create_api_client"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: manage.py create_api_client" in done.stdout
