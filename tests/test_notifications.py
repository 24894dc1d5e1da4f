"""Failure notifications through Prefect's own automations (infra/automations/notify-on-failure.yaml,
docs/lifecycle.md): the file is a valid automation; and end to end against a real ``prefect server start``
(its triggers and actions services), a failed ``midpo-retrain`` run and a crashed ``midpo`` run reach a
webhook notification block served by this test, while other flows and successful runs do not."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AUTOMATION = ROOT / "infra" / "automations" / "notify-on-failure.yaml"
CREATE = ROOT / "infra" / "automations" / "create.py"


def test_the_automation_file_is_a_valid_prefect_automation():
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    text = AUTOMATION.read_text()
    assert "MIDPO_NOTIFY_BLOCK_ID" in text
    block_id = uuid.uuid4()
    automation = AutomationCore.model_validate(yaml.safe_load(text.replace("MIDPO_NOTIFY_BLOCK_ID", str(block_id))))
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger) and trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
    related = trigger.match_related if not isinstance(trigger.match_related, list) else trigger.match_related[0]
    assert set(related["prefect.resource.name"]) == {"midpo-retrain", "midpo", "midpo-promote"} and related["prefect.resource.role"] == ["flow"]
    [action] = automation.actions
    assert isinstance(action, SendNotification) and action.block_document_id == block_id
    assert "{{ flow_run.state.message }}" in action.body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free port with a temporary PREFECT_HOME (its services on, as by default);
    yields the environment of a client of it. Stopped (its process group) at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_SERVER_LEVEL="INFO",
        NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
    )
    env["no_proxy"] = env["NO_PROXY"]
    log = (home / "server.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 180, "the Prefect server did not come up in 180 s"
            time.sleep(0.5)
        print(f"prefect server up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield {**env, "PREFECT_API_URL": url, "_LOG": str(home / "server.log")}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _python(env: dict[str, str], code: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def test_failed_retraining_run_notifies_through_the_automation(prefect_server):
    t0 = time.monotonic()
    env = prefect_server
    _Hook.received = []
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        # the notification block, as docs/lifecycle.md creates it (a custom webhook instead of Slack)
        _python(env, f"""
            from prefect.blocks.notifications import CustomWebhookNotificationBlock
            CustomWebhookNotificationBlock(
                name="midpo-test", url="http://127.0.0.1:{hook.server_port}/hook",
                json_data={{"subject": "{{{{subject}}}}", "body": "{{{{body}}}}"}},
            ).save("midpo-alerts", overwrite=True)
        """)
        # the automation from the file, by the documented script (twice: the second replaces the first)
        for _ in range(2):
            done = subprocess.run([sys.executable, str(CREATE), "--block", "custom-webhook/midpo-alerts"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
            assert "Created automation 'midpo-notify-on-failure'" in done.stdout
        automations = httpx.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}).json()
        assert [a["name"] for a in automations] == ["midpo-notify-on-failure"]
        # runs that must not notify (another flow failing, a retraining succeeding), then two that must
        _python(env, """
            from prefect import flow
            from prefect.client.orchestration import get_client
            from prefect.states import Crashed, Running

            @flow(name="some-other-flow")
            def other():
                raise ValueError("not ours")

            @flow(name="midpo-retrain")
            def ok():
                return 1

            @flow(name="midpo-retrain")
            def broken():
                raise ValueError("the watched prefix is unreadable (test)")

            @flow(name="midpo")
            def pipeline():
                pass

            assert other(return_state=True).is_failed()
            assert ok(return_state=True).is_completed()
            assert broken(return_state=True).is_failed()
            with get_client(sync_client=True) as client:  # a crash (a killed worker) without killing one
                run = client.create_flow_run(pipeline, name="crashed-pipeline")
                client.set_flow_run_state(run.id, Running())
                client.set_flow_run_state(run.id, Crashed(message="the worker was lost (test)"), force=True)
        """)
        deadline = time.monotonic() + 60
        while len(_Hook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # anything else would have arrived by now (events are handled in order)
    finally:
        hook.shutdown()
    subjects = sorted(m["subject"] for m in _Hook.received)
    assert len(subjects) == 2, (subjects, Path(env["_LOG"]).read_text()[-4000:])
    assert subjects[0].startswith("midpo: midpo run crashed-pipeline Crashed")
    assert subjects[1].startswith("midpo: midpo-retrain run ") and subjects[1].endswith(" Failed")
    failed = next(m for m in _Hook.received if m["subject"].endswith("Failed"))
    assert "ValueError: the watched prefix is unreadable (test)" in failed["body"] and "Flow run id:" in failed["body"]
    print(f"notification test took {time.monotonic() - t0:.1f} s", file=sys.stderr)
