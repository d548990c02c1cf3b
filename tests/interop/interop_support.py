"""Helpers of the interop suite: child processes with logs and readiness waits, a reader of the
Langfuse stand-in, small HTTP helpers. The fixtures live in conftest.py; the tests import this
module for the helpers."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Every process the suite started and has not stopped yet, so a failing test can print their logs.
LIVE: list["Proc"] = []
_LIVE_LOCK = threading.Lock()


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot listen on port 0 and report
    it: redis-server, the LiteLLM proxy). The caller retries a start that loses the race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartError(RuntimeError):
    pass


class Proc:
    """A child process whose stdout and stderr go to one log file, killed at stop()."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Optional[dict] = None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        n = 1
        while self.log_path.exists():
            n += 1
            self.log_path = log_dir / f"{name}-{n}.log"
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        full_env.setdefault("NO_COLOR", "1")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        with _LIVE_LOCK:
            LIVE.append(self)

    def text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return ANSI.sub("", f.read().decode(errors="replace"))
        except FileNotFoundError:
            return ""

    def size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def tail(self, lines: int = 60, since: int = 0) -> str:
        return "\n".join(self.text(since).splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        """Waits until the log has a line matching `pattern`; fails if the process exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if not self.alive():
                raise StartError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        raise StartError(f"{self.name}: no line matching {pattern!r} within {timeout} s:\n{self.tail()}")

    def wait_http(self, url: str, timeout: float, ok: Callable[[int], bool] = lambda s: s == 200) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if ok(r.status):
                        return
                    last = r.status
            except urllib.error.HTTPError as e:
                if ok(e.code):
                    return
                last = e.code
            except OSError as e:
                last = e
            time.sleep(0.2)
        raise StartError(f"{self.name}: {url} not ready within {timeout} s (last: {last}):\n{self.tail()}")

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, 9)
                except ProcessLookupError:
                    pass
                self.popen.wait(grace)
        self._log.close()
        with _LIVE_LOCK:
            if self in LIVE:
                LIVE.remove(self)


# === HTTP ===


def http(method: str, url: str, body: Any = None, headers: Optional[dict] = None, timeout: float = 30):
    """(status, headers, body bytes); no exception on HTTP error statuses. A dropped connection
    raises (as a client would see it)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def rollout_path(
    rollout_id: str, row_id: str = "row-0", invocation_id: str = "inv-1", experiment_id: str = "exp-1", run_id: str = "run-1"
) -> str:
    """The path eval-protocol's build_fireworks_tracing_url appends to the gateway URL."""
    return (
        f"/rollout_id/{rollout_id}/invocation_id/{invocation_id}/experiment_id/{experiment_id}"
        f"/run_id/{run_id}/row_id/{row_id}"
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**12}"


# === The Langfuse stand-in ===


class LangfuseReader:
    """Reads the stand-in's v3 API (the one eval-protocol's LangfuseAdapter uses)."""

    def __init__(self, url: str, public_key: str, secret_key: str):
        self.url = url
        self.public_key = public_key
        self.secret_key = secret_key
        token = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode()
        self._auth = {"authorization": f"Basic {token}"}

    def _get(self, path: str, params: Iterable[tuple[str, str]] = ()) -> Any:
        q = urllib.parse.urlencode(list(params))
        status, _, body = http("GET", f"{self.url}{path}{'?' + q if q else ''}", headers=self._auth)
        if status != 200:
            raise AssertionError(f"stand-in GET {path} → {status}: {body[:300]!r}")
        return json.loads(body)

    def traces(self, tags: list[str]) -> list[dict]:
        out, page = [], 1
        while True:
            data = self._get("/api/public/traces", [("tags", t) for t in tags] + [("page", str(page)), ("limit", "100")])
            out.extend(data["data"])
            if page >= data["meta"]["totalPages"]:
                return out
            page += 1

    def trace(self, trace_id: str) -> dict:
        return self._get(f"/api/public/traces/{trace_id}")

    def full_traces(self, tags: list[str]) -> list[dict]:
        return [self.trace(t["id"]) for t in self.traces(tags)]

    def wait_traces(self, tags: list[str], at_least: int, timeout: float = 30.0, settle: float = 2.0) -> list[dict]:
        """Full traces carrying every tag in `tags`, once at least `at_least` are there and no new
        one arrived for `settle` seconds (every exporter of the suite flushes within ~0.3 s)."""
        deadline = time.monotonic() + timeout
        seen = -1
        stable_since = time.monotonic()
        while True:
            traces = self.traces(tags)
            n = len(traces) + sum(len(t["observations"]) for t in traces)
            now = time.monotonic()
            if n != seen:
                seen, stable_since = n, now
            if len(traces) >= at_least and now - stable_since >= settle:
                return [self.trace(t["id"]) for t in traces]
            if now > deadline:
                if len(traces) >= at_least:
                    return [self.trace(t["id"]) for t in traces]
                raise AssertionError(
                    f"Langfuse stand-in: {len(traces)} trace(s) tagged {tags} after {timeout} s, wanted {at_least}"
                )
            time.sleep(0.2)


def observations_named(trace: dict, name: str) -> list[dict]:
    return [o for o in trace["observations"] if o["name"] == name]


def is_litellm_trace(trace: dict) -> bool:
    return any(o["name"] == "litellm_request" for o in trace["observations"])


def final_answer(messages) -> Optional[str]:
    """The content of the last assistant message of eval-protocol Message objects."""
    for m in reversed(messages):
        if m.role == "assistant":
            return m.content if isinstance(m.content, str) or m.content is None else str(m.content)
    return None

