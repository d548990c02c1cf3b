"""A whole rollout through eval-protocol's RemoteRolloutProcessor, in both modes, JSON and
streamed: the processor POSTs `/init` to the suite's rollout server (rollout_server.py), which
calls the model through llmgate at `model_base_url` and logs its progress and end to llmgate's
`/logs` through eval-protocol's FireworksTracingHttpHandler; the processor polls llmgate's
`/v1/status` until the status is no longer RUNNING, backfills message, details and extras from
`/logs`, then reads each row's trace back through llmgate's `/v1/traces/pointwise`
(FireworksTracingAdapter) and must find every row's final answer.

How a row ends is in docs/interop.md ("/status and /logs"). Without those routes a row would
poll until `timeout_seconds` and end DEADLINE_EXCEEDED; here each must end as soon as its
terminal status is logged, with what the rollout server logged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import pytest

from conftest import MOCK_JSON_ANSWER, MOCK_STREAM_ANSWER
from interop_support import unique
from rollout_server import FAIL_MARKER, RolloutServer

ROWS = 3
# How long a row polls /status before the processor gives up on it (it then still reads the trace).
STATUS_TIMEOUT_S = 30.0
# A row that learns its end from /status ends within this (the mock answers in milliseconds).
ENDS_WITHIN_S = 10.0

MODES = [
    pytest.param("openai", False, id="openai-json"),
    pytest.param("openai", True, id="openai-stream"),
    pytest.param("litellm", False, id="litellm-json", marks=pytest.mark.litellm),
    pytest.param("litellm", True, id="litellm-stream", marks=pytest.mark.litellm),
]

_RUNS: dict[tuple[str, bool], dict] = {}


def _rows(experiment: str):
    from eval_protocol.models import EvaluationRow, ExecutionMetadata, InputMetadata, Message

    rows = []
    for i in range(ROWS):
        rows.append(
            EvaluationRow(
                messages=[Message(role="user", content=f"question {i}")],
                input_metadata=InputMetadata(row_id=f"row-{i}"),
                execution_metadata=ExecutionMetadata(
                    invocation_id="inv-1",
                    experiment_id=experiment,
                    rollout_id=unique(f"rollout-{i}"),
                    run_id="run-1",
                ),
            )
        )
    return rows


def _process(gateway_url: str, rows, stream: bool, log_url: Optional[str] = None) -> dict:
    """Runs `rows` through RemoteRolloutProcessor against the gateway at `gateway_url` (the
    rollout server logs to `log_url`, by default the same gateway)."""
    from eval_protocol.pytest.remote_rollout_processor import RemoteRolloutProcessor
    from eval_protocol.pytest.types import RolloutProcessorConfig

    with pytest.MonkeyPatch.context() as mp:
        # build_init_request, the trace loader and the log handler take the client key from here.
        mp.setenv("FIREWORKS_API_KEY", "sk-interop-client")
        for var in ("EP_REMOTE_API_KEY", "EP_REMOTE_ROLLOUT_PROCESSOR_BASE_URL", "EP_MODEL_BASE_URL"):
            mp.delenv(var, raising=False)
        server = RolloutServer(gateway_url=gateway_url, api_key="sk-interop-client", log_url=log_url)
        try:
            processor = RemoteRolloutProcessor(
                remote_base_url=server.url,
                model_base_url=gateway_url,
                poll_interval=0.2,
                timeout_seconds=STATUS_TIMEOUT_S,
            )
            config = RolloutProcessorConfig(
                completion_params={"model": "gpt-4o", "stream": stream},
                mcp_config_path="",
                semaphore=asyncio.Semaphore(len(rows)),
            )

            async def main():
                try:
                    return await asyncio.gather(*processor(rows, config), return_exceptions=True)
                finally:
                    await processor.acleanup()

            started = time.monotonic()
            results = asyncio.run(asyncio.wait_for(main(), timeout=120))
            elapsed = time.monotonic() - started
        finally:
            server.close()
    return {"rows": results, "server": server, "elapsed": elapsed}


def _run(module_gateways, mode: str, stream: bool) -> dict:
    """Runs the rollout once per (mode, stream); the tests of a mode read the same run."""
    key = (mode, stream)
    if key not in _RUNS:
        gw = module_gateways.start(mode)
        _RUNS[key] = _process(gw.localhost_url, _rows(unique(f"exp-{mode}")), stream)
    return _RUNS[key]


def _assert_finished_as_logged(run: dict) -> None:
    """Every row ended FINISHED, learnt from llmgate's `/v1/status` well before the deadline,
    with the message, details and extras the rollout server logged."""
    from eval_protocol.models import Status

    # The whole batch (status polls, then the trace reads) ends long before one row's deadline.
    assert run["elapsed"] < ENDS_WITHIN_S, run["elapsed"]
    server: RolloutServer = run["server"]
    for row in run["rows"]:
        assert not isinstance(row, BaseException), repr(row)
        rid = row.execution_metadata.rollout_id
        logged = server.results[rid]
        assert row.rollout_status.code == Status.Code.FINISHED, row.rollout_status
        assert row.rollout_status.message == logged["status"].message
        assert row.rollout_status.details == logged["status"].details
        assert row.rollout_status.details, "the finished status carries extra_info details"
        assert row.execution_metadata.extra == logged["extras"], row.execution_metadata.extra


@pytest.mark.parametrize("mode,stream", MODES)
def test_rollout_every_row_gets_its_final_answer(module_gateways, mode, stream):
    run = _run(module_gateways, mode, stream)
    server: RolloutServer = run["server"]
    expected = MOCK_STREAM_ANSWER if stream else MOCK_JSON_ANSWER
    # The rollout server itself got the answer through llmgate, on the rollout path.
    assert len(server.results) == ROWS
    for rid, result in server.results.items():
        assert result.get("answer") == expected, f"{rid}: {result}"
        assert f"/rollout_id/{rid}/" in result["model_base_url"]
    # The rows came back from llmgate's /traces with the answer last.
    for row in run["rows"]:
        assert not isinstance(row, BaseException), repr(row)
        roles = [m.role for m in row.messages]
        assert roles == ["user", "assistant"], f"{row.execution_metadata.rollout_id}: {row.messages}"
        assert row.messages[-1].content == expected, f"{row.execution_metadata.rollout_id}: {row.messages}"
        assert row.messages[0].content.startswith("question ")


@pytest.mark.parametrize("mode,stream", MODES)
def test_rollout_rows_finish_through_status_endpoint(module_gateways, mode, stream):
    """The rows end with status FINISHED (100), learnt from llmgate's `/v1/status` (the rollout
    server logged it to `/logs`), not DEADLINE_EXCEEDED after `timeout_seconds`."""
    _assert_finished_as_logged(_run(module_gateways, mode, stream))


def test_failing_rollout_raises_internal_error(module_gateways):
    """A rollout that logs code 13 (INTERNAL) surfaces as eval-protocol's InternalError with the
    logged message, at once; the other rows of the batch are unaffected."""
    from eval_protocol.exceptions import InternalError

    gw = module_gateways.start("openai")
    rows = _rows(unique("exp-fail"))
    rows[1].messages[0].content = f"question 1, {FAIL_MARKER}"
    run = _process(gw.localhost_url, rows, stream=False)
    failed = run["rows"][1]
    assert isinstance(failed, InternalError), repr(failed)
    assert "failed on purpose" in str(failed)
    _assert_finished_as_logged({**run, "rows": [run["rows"][0], run["rows"][2]]})


def test_two_replicas_on_one_redis_serve_each_others_status(gateways):
    """The rollout server logs to one replica; the processor calls the model through and polls
    the other; both share one Redis."""
    first = gateways.start("openai")
    second = gateways.start("openai", redis_url=first.redis_url)
    run = _process(second.localhost_url, _rows(unique("exp-replicas")), stream=False, log_url=first.localhost_url)
    _assert_finished_as_logged(run)
    for row in run["rows"]:
        assert row.messages[-1].content == MOCK_JSON_ANSWER
