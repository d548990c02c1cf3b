"""The suite's own remote rollout server, as eval-protocol's RemoteRolloutProcessor expects one
(eval_protocol/pytest/remote_rollout_processor.py, types/remote_rollout_processor.py):

- `POST /init` takes an `InitRequest` and answers at once; the rollout runs in the background.
- The rollout calls the model through `model_base_url` (the gateway URL with the rollout path
  that `build_init_request` built) with the OpenAI SDK, JSON or streamed as
  `completion_params["stream"]` says.
- It reports its progress and its end the way eval-protocol's rollout servers do: log records
  with `extra={"status": Status.rollout_running()}` at the start and
  `extra={"status": Status.rollout_finished(…), "extras": {…}}` (or an error status) at the end,
  through eval-protocol's `FireworksTracingHttpHandler`, which POSTs them to `{log_url}/logs`
  (the gateway, or another replica of it). RemoteRolloutProcessor learns the end by polling
  `GET {gateway}/v1/status?rollout_id=…` and backfills message, details and extras from
  `GET {gateway}/logs?tags=rollout_id:…` (docs/interop.md, "/status and /logs").
- A row whose first message contains `please fail` ends with `Status.rollout_internal_error`
  (code 13) without calling the model.

It runs inside the test process, on a thread, on an ephemeral port.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import openai
from eval_protocol.log_utils.fireworks_tracing_http_handler import FireworksTracingHttpHandler
from eval_protocol.models import Status

FAIL_MARKER = "please fail"
from eval_protocol.types.remote_rollout_processor import InitRequest


class RolloutServer:
    def __init__(self, gateway_url: str, api_key: str, log_url: Optional[str] = None):
        self.gateway_url = gateway_url
        self.api_key = api_key
        # rollout_id → {"answer"|"error", "model_base_url", "status": the Status logged at the end,
        # "extras": the extras logged with it}
        self.results: dict[str, dict] = {}
        self.init_requests: list[dict] = []
        self._done = threading.Condition()
        self._threads: list[threading.Thread] = []
        # Logs go to the gateway's /logs only (not to the test's root logger).
        self.logger = logging.getLogger(f"interop.rollout_server.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.handler = FireworksTracingHttpHandler(gateway_base_url=log_url or gateway_url)
        self.logger.addHandler(self.handler)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                if self.path.rstrip("/") != "/init":
                    self.send_error(404)
                    return
                raw = self.rfile.read(int(self.headers.get("content-length", "0") or 0))
                try:
                    payload = json.loads(raw)
                    req = InitRequest(**payload)
                except Exception as e:  # noqa: BLE001
                    self._reply(400, {"error": f"Request parsing error: {e}"})
                    return
                server.init_requests.append(payload)
                t = threading.Thread(target=server._rollout, args=(req,), daemon=True)
                server._threads.append(t)
                t.start()
                self._reply(200, {"status": "accepted", "rollout_id": req.metadata.rollout_id})

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._serve = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._serve.start()

    def _rollout(self, req: InitRequest) -> None:
        rid = req.metadata.rollout_id
        # `rollout_id` on a record is what FireworksTracingHttpHandler tags the log with (the same
        # as RolloutIdFilter sets).
        self.logger.info(f"Rollout {rid} started", extra={"status": Status.rollout_running(), "rollout_id": rid})
        result: dict = {"model_base_url": req.model_base_url}
        params = dict(req.completion_params)
        stream = bool(params.pop("stream", False))
        messages = [m.model_dump(exclude_none=True) for m in req.messages or []]
        kwargs = {"model": params.pop("model"), "messages": messages}
        for k in ("temperature", "max_tokens", "top_p"):
            if params.get(k) is not None:
                kwargs[k] = params[k]
        if req.tools:
            kwargs["tools"] = req.tools
        client = openai.OpenAI(base_url=req.model_base_url, api_key=req.api_key or self.api_key, max_retries=0, timeout=60)
        status: Optional[Status] = None
        try:
            if any(FAIL_MARKER in str(m.get("content", "")) for m in messages):
                raise RuntimeError(f"rollout {rid} failed on purpose")
            if stream:
                parts = []
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            parts.append(choice.delta.content)
                result["answer"] = "".join(parts)
            else:
                completion = client.chat.completions.create(**kwargs)
                result["answer"] = completion.choices[0].message.content
            status = Status.rollout_finished(extra_info={"answer_chars": len(result["answer"] or "")})
        except openai.RateLimitError as e:
            result["error"] = repr(e)
            status = Status.rollout_resource_exhausted_error(str(e))
        except Exception as e:  # noqa: BLE001
            result["error"] = repr(e)
            status = Status.rollout_internal_error(str(e), extra_info={"where": "rollout server"})
        extras = {"server": "interop", "answer": result.get("answer")}
        result["status"] = status
        result["extras"] = extras
        # Recorded before the log goes out: once the gateway has the status, the processor may
        # read this result.
        with self._done:
            self.results[rid] = result
            self._done.notify_all()
        self.logger.info(f"Rollout {rid} ended", extra={"status": status, "rollout_id": rid, "extras": extras})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=10)
        self.logger.removeHandler(self.handler)
