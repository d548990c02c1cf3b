"""Fixtures of the interop suite: real redis-server, llmgate's mock upstream (the provider), the
Langfuse stand-in, a real LiteLLM proxy with its `langfuse_otel` callback, and llmgate itself in
`openai` and `litellm` mode. Every process listens on an ephemeral loopback port, is waited for
with a bounded timeout, is killed at teardown, and has its log kept (printed when a test fails).

Binaries: `LLMGATE_BIN` and `LANGFUSE_STAND_IN_BIN` (scripts/interop.sh sets them), else
`target/debug/`. Engine: `LLMGATE_TEST_ENGINE=hyper|pingora` (default hyper).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from interop_support import LIVE, LangfuseReader, Proc, StartError, free_port, http

# eval-protocol imports litellm in this process: no start-up fetch of the model cost map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parents[2]

LITELLM_MASTER_KEY = "sk-interop-master-key"
# The Langfuse projects of the stand-in and of llmgate's secrets file: id → (public, secret).
PROJECTS = {
    "p1": ("pk-lf-interop-p1", "sk-lf-interop-p1"),
    "p2": ("pk-lf-interop-p2", "sk-lf-interop-p2"),
}
DEFAULT_PROJECT = "p1"
ENGINE = os.environ.get("LLMGATE_TEST_ENGINE", "hyper")
if ENGINE not in ("hyper", "pingora"):
    raise pytest.UsageError(f"LLMGATE_TEST_ENGINE must be hyper or pingora, not {ENGINE!r}")

# The mock's fixed answers (src/mock_upstream.rs).
MOCK_JSON_ANSWER = "This is a mock completion."
MOCK_STREAM_ANSWER = "tok0 tok1 tok2 tok3 tok4 "


def pytest_configure(config):
    config.addinivalue_line("markers", "litellm: needs the LiteLLM proxy")


# === logs of failed tests ===


def pytest_runtest_setup(item):
    # Where each live process's log stood when the test began: a failure prints what came after.
    item._interop_log_offsets = {id(p): p.size() for p in LIVE}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        offsets = getattr(item, "_interop_log_offsets", {})
        for proc in list(LIVE):
            text = proc.tail(80, since=offsets.get(id(proc), 0))
            if text.strip():
                report.sections.append((f"log of {proc.name} during the test ({proc.log_path})", text))


# === binaries ===


def _binary(env: str, name: str) -> str:
    path = os.environ.get(env) or str(ROOT / "target" / "debug" / name)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.exit(f"interop: {name} not found at {path} (build it, or set {env})", returncode=3)
    return path


@pytest.fixture(scope="session")
def llmgate_bin() -> str:
    return _binary("LLMGATE_BIN", "llmgate")


@pytest.fixture(scope="session")
def stand_in_bin() -> str:
    return _binary("LANGFUSE_STAND_IN_BIN", "langfuse-stand-in")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("INTEROP_LOG_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("interop-logs")


def _ready(proc, port, wait):
    """Waits for a started process to be ready (stopping it when it is not) and notes its port."""
    try:
        wait()
    except StartError:
        proc.stop()
        raise
    proc.port = port  # type: ignore[attr-defined]
    return proc


def _start_on_free_port(start, attempts: int = 3):
    """Starts a server that needs its port chosen up front, retrying when the port was taken."""
    last: Optional[Exception] = None
    for _ in range(attempts):
        port = free_port()
        try:
            return start(port)
        except StartError as e:
            last = e
    raise last  # type: ignore[misc]


# === Redis ===


@dataclass
class RedisServer:
    url: str
    proc: Proc
    _dbs: itertools.count = field(default_factory=lambda: itertools.count(1))

    def fresh_db_url(self) -> str:
        """A database of its own for each gateway: cooldowns and rate counters never leak between
        tests."""
        return f"{self.url}/{next(self._dbs)}"

    def client(self, url: str):
        import redis

        return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_server(log_dir) -> RedisServer:
    exe = shutil.which("redis-server")
    if not exe:
        pytest.exit("interop: redis-server not found (scripts/interop.sh installs it)", returncode=3)

    def start(port: int) -> Proc:
        proc = Proc(
            "redis-server",
            [exe, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--databases", "1024"],
            log_dir,
        )
        return _ready(proc, port, lambda: proc.wait_for_line(r"Ready to accept connections", timeout=15))

    proc = _start_on_free_port(start)
    server = RedisServer(url=f"redis://127.0.0.1:{proc.port}", proc=proc)  # type: ignore[attr-defined]
    yield server
    proc.stop()


# === the provider: llmgate's mock upstream ===


@pytest.fixture(scope="session")
def mock_upstream(llmgate_bin, log_dir) -> str:
    """The mock's base URL, `http://127.0.0.1:P/v1`."""
    proc = Proc("mock-upstream", [llmgate_bin, "mock-upstream", "--port", "0"], log_dir)
    try:
        url = proc.wait_for_line(r"mock upstream listening on (http://\S+)", timeout=20).group(1)
    except StartError:
        proc.stop()
        raise
    yield url
    proc.stop()


# === the Langfuse stand-in ===


@dataclass
class Langfuse:
    url: str
    proc: Proc

    def reader(self, project: str = DEFAULT_PROJECT) -> LangfuseReader:
        pk, sk = PROJECTS[project]
        return LangfuseReader(self.url, pk, sk)

    def sdk(self, project: str = DEFAULT_PROJECT):
        """The Langfuse Python SDK (the version eval-protocol's LangfuseAdapter imports) on the
        stand-in, tracing off."""
        from langfuse import Langfuse as LangfuseClient

        pk, sk = PROJECTS[project]
        return LangfuseClient(public_key=pk, secret_key=sk, host=self.url, tracing_enabled=False)


@pytest.fixture(scope="session")
def langfuse(stand_in_bin, log_dir) -> Langfuse:
    argv = [stand_in_bin, "--port", "0", "--keep"]
    for project, (pk, sk) in PROJECTS.items():
        argv += ["--project", f"{project}:{pk}:{sk}"]
    proc = Proc("langfuse-stand-in", argv, log_dir)
    try:
        url = proc.wait_for_line(r"listening on (http://\S+)", timeout=20).group(1)
    except StartError:
        proc.stop()
        raise
    yield Langfuse(url=url, proc=proc)
    proc.stop()


# === LiteLLM proxy ===


@dataclass
class LiteLLM:
    url: str
    master_key: str
    proc: Proc
    langfuse_url: str

    def chat(self, body: dict, headers: Optional[dict] = None, project: str = DEFAULT_PROJECT):
        """A chat completion straight to LiteLLM, with the per-request Langfuse keys in the body
        as llmgate (and the original gateway) inject them."""
        pk, sk = PROJECTS[project]
        body = dict(body, langfuse_public_key=pk, langfuse_secret_key=sk, langfuse_host=self.langfuse_url)
        hdrs = {"authorization": f"Bearer {self.master_key}", **(headers or {})}
        return http("POST", f"{self.url}/chat/completions", body, hdrs)


LITELLM_CONFIG = """\
# As the seed's config_no_cache.yaml.
model_list:
  - model_name: "*"
    litellm_params:
      model: "*"
litellm_settings:
  callbacks: ["langfuse_otel"]
  drop_params: True
general_settings:
  allow_client_side_credentials: true
"""


@pytest.fixture(scope="session")
def litellm(mock_upstream, langfuse, log_dir, tmp_path_factory) -> LiteLLM:
    workdir = tmp_path_factory.mktemp("litellm")
    config = workdir / "config.yaml"
    config.write_text(LITELLM_CONFIG)
    exe = Path(sys.executable).parent / "litellm"
    if not exe.exists():
        pytest.exit(f"interop: the litellm proxy CLI is not in the venv ({exe})", returncode=3)
    env = {
        # LiteLLM 1.106.12 refuses to start without one.
        "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
        # No start-up fetches (model cost map) on a machine without internet.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        # The provider: the wildcard model sends bare OpenAI names to the OpenAI provider.
        "OPENAI_API_BASE": mock_upstream,
        "OPENAI_BASE_URL": mock_upstream,
        "OPENAI_API_KEY": "sk-interop-provider-key",
        # langfuse_otel: the host when a request carries none (llmgate injects langfuse_host).
        "LANGFUSE_HOST": langfuse.url,
        # Export within ~0.2 s instead of the SDK's 5 s batch delay.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    for var in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_OTEL_HOST", "DATABASE_URL"):
        env[var] = None  # unset

    def start(port: int) -> Proc:
        proc = Proc(
            "litellm-proxy",
            [exe, "--config", config, "--host", "127.0.0.1", "--port", port, "--num_workers", "1"],
            log_dir,
            env=env,
            cwd=workdir,
        )
        return _ready(proc, port, lambda: proc.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=120))

    proc = _start_on_free_port(start)
    yield LiteLLM(
        url=f"http://127.0.0.1:{proc.port}",  # type: ignore[attr-defined]
        master_key=LITELLM_MASTER_KEY,
        proc=proc,
        langfuse_url=langfuse.url,
    )
    proc.stop()


# === llmgate ===


@dataclass
class Gateway:
    url: str
    mode: str
    proc: Proc
    redis_url: str

    def chat(self, body: dict, path: str = "", headers: Optional[dict] = None, key: str = "sk-interop-client"):
        hdrs = {"authorization": f"Bearer {key}", **(headers or {})}
        return http("POST", f"{self.url}{path}/chat/completions", body, hdrs)

    @property
    def localhost_url(self) -> str:
        """The URL with `localhost`, which eval-protocol's build_init_request rewrites into the
        rollout path (it rewrites `http://localhost…`, not `http://127.0.0.1…`)."""
        return self.url.replace("127.0.0.1", "localhost")


class GatewayFactory:
    """Starts llmgate processes (each with a Redis database of its own) and stops them all."""

    def __init__(self, llmgate_bin, log_dir, redis_server, mock_upstream, langfuse, workdir: Path, request):
        self.bin = llmgate_bin
        self.log_dir = log_dir
        self.redis = redis_server
        self.mock = mock_upstream
        self.langfuse = langfuse
        self.workdir = workdir
        self.request = request
        self.started: list[Gateway] = []
        secrets = {
            "langfuse_keys": {p: {"public_key": pk, "secret_key": sk} for p, (pk, sk) in PROJECTS.items()},
            "default_project_id": DEFAULT_PROJECT,
        }
        self.secrets_path = workdir / "secrets.yaml"
        self.secrets_path.write_text(json.dumps(secrets))  # JSON is YAML

    def start(
        self,
        mode: str = "openai",
        *,
        litellm_key: bool = True,
        models: Optional[list] = None,
        allow_base_urls: tuple = (),
        extra_config: Optional[dict] = None,
        redis_url: Optional[str] = None,
    ) -> Gateway:
        """`openai` mode: `UPSTREAM_URL` at the mock. `litellm` mode: `LITELLM_URL` at the LiteLLM
        proxy; with `litellm_key` the upstream's `api_key_env` puts LiteLLM's master key in
        `Authorization` (else the client's own key is forwarded, as in the original gateway).
        `redis_url` shares another gateway's Redis database (replicas); by default each gateway
        gets one of its own."""
        config: dict = {"langfuse": {"export": {"batch_delay_ms": 200}}}
        redis_url = redis_url or self.redis.fresh_db_url()
        env = {
            "HOST": "127.0.0.1",
            "PORT": "0",
            "LOG_LEVEL": "info",
            "RUST_BACKTRACE": "0",
            "REQUEST_TIMEOUT": "60",
            "REDIS_URL": redis_url,
            "LANGFUSE_HOST": self.langfuse.url,
            "SECRETS_PATH": str(self.secrets_path),
            "UPSTREAM_URL": None,
            "LITELLM_URL": None,
            "UPSTREAM_MODE": None,
            "REDIS_HOST": None,
            "LLMGATE_CONFIG": None,
        }
        if mode == "openai":
            env["UPSTREAM_URL"] = self.mock
        elif mode == "litellm":
            litellm: LiteLLM = self.request.getfixturevalue("litellm")
            env["LITELLM_URL"] = litellm.url
            if litellm_key:
                env["LLMGATE_INTEROP_LITELLM_KEY"] = litellm.master_key
                config["upstreams"] = {
                    "litellm": {"url": litellm.url, "mode": "litellm", "api_key_env": "LLMGATE_INTEROP_LITELLM_KEY"}
                }
                config["default_upstream"] = "litellm"
        else:
            raise ValueError(mode)
        if models is not None:
            config["models"] = models
        if allow_base_urls:
            config["encoded_base_url"] = {"allow": list(allow_base_urls)}
        for key, value in (extra_config or {}).items():
            config[key] = value
        n = len(self.started) + 1
        config_path = self.workdir / f"llmgate-{mode}-{n}.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        proc = Proc(
            f"llmgate-{mode}",
            [self.bin, "serve", "--config", config_path, "--engine", ENGINE],
            self.log_dir,
            env=env,
        )
        try:
            addr = proc.wait_for_line(r"llmgate listening on http://(\S+)", timeout=30).group(1)
            proc.wait_http(f"http://{addr}/health", timeout=10)
        except StartError:
            proc.stop()
            raise
        gw = Gateway(url=f"http://{addr}", mode=mode, proc=proc, redis_url=redis_url)
        self.started.append(gw)
        return gw

    def stop_all(self) -> None:
        for gw in self.started:
            gw.proc.stop()
        self.started.clear()


@pytest.fixture
def gateways(llmgate_bin, log_dir, redis_server, mock_upstream, langfuse, tmp_path, request):
    """`gateways.start(mode, …)`: llmgate processes that live for one test."""
    factory = GatewayFactory(llmgate_bin, log_dir, redis_server, mock_upstream, langfuse, tmp_path, request)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_gateways(llmgate_bin, log_dir, redis_server, mock_upstream, langfuse, tmp_path_factory, request):
    """`module_gateways.start(mode, …)`: llmgate processes shared by one module's tests."""
    factory = GatewayFactory(
        llmgate_bin, log_dir, redis_server, mock_upstream, langfuse, tmp_path_factory.mktemp("gw"), request
    )
    yield factory
    factory.stop_all()
