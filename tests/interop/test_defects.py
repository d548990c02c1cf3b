"""The five defects of issue 15, one or two tests each. Every test here fails on the main of
81cf9af (see docs/interop.md for what each one saw there)."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from conftest import MOCK_JSON_ANSWER, MOCK_STREAM_ANSWER
from interop_support import final_answer, is_litellm_trace, observations_named, rollout_path, unique


def _error_message(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


# === 1. A panic drops the client's connection ===


def test_defect1_small_json_400_from_provider_reaches_client(gateways):
    """A provider's small JSON 400 with a content-length, for a model of the catalogue
    (gpt-4o), must reach the client as 400 with the provider's body, not as a dropped
    connection (a panic in insertion-id's RecordBody::size_hint)."""
    gw = gateways.start("openai")
    status, _, body = gw.chat(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        path=rollout_path(unique("d1")),
        headers={"x-mock-status": "400", "x-mock-error-code": "invalid_request_error"},
    )
    assert status == 400
    assert _error_message(body) == "mock error invalid_request_error"


@pytest.mark.litellm
def test_defect1_litellm_no_connected_db_400_reaches_client(gateways, litellm):
    """The production case: the client's own key forwarded to a LiteLLM proxy that has a master
    key and no database; LiteLLM answers 400 `{"error":{"message":"No connected db.",…}}`
    (92 bytes, with content-length). The OpenAI SDK must get that 400, not a dropped
    connection."""
    gw = gateways.start("litellm", litellm_key=False)
    client = openai.OpenAI(
        base_url=gw.url + rollout_path(unique("d1l")), api_key="sk-client-own-key", max_retries=0, timeout=30
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400
    assert err.value.body["message"] == "No connected db."


# === 2. One client's 429 blocks every client ===


def test_defect2_clients_own_key_429_reaches_only_that_client(gateways):
    """Client A's own key earns a provider 429 for gpt-4o (the mock fails gpt-4o only, so a
    reroute to any other model would succeed). A must get the provider's 429 and text, never a
    model nobody configured (no `models:` in the config: the built-in catalogue would move
    gpt-4o to gpt-4.1). Clients B (another project) and C (same project, another key) must
    reach the upstream unaffected, with no cooldown."""
    gw = gateways.start("openai")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    status, _, answer = gw.chat(
        body,
        path=rollout_path(unique("d2a")),
        key="sk-client-a-own-key",
        headers={"x-mock-fail": "gpt-4o=429:rate_limit_exceeded", "x-mock-retry-after": "1"},
    )
    assert status == 429, f"client A got {status}: {answer[:300]!r}"
    assert _error_message(answer) == "Rate limit reached for gpt-4o"

    status, _, answer = gw.chat(body, path="/project_id/p2" + rollout_path(unique("d2b")), key="sk-client-b")
    assert status == 200, f"client B (project p2) got {status}: {answer[:300]!r}"
    assert json.loads(answer)["model"] == "gpt-4o"

    status, _, answer = gw.chat(body, path=rollout_path(unique("d2c")), key="sk-client-c")
    assert status == 200, f"client C (project p1, another key) got {status}: {answer[:300]!r}"
    assert json.loads(answer)["model"] == "gpt-4o"


def test_defect2_own_encoded_base_url_provider_429_does_not_cool_down_others(gateways, mock_upstream):
    """Client A's own provider (its `encoded_base_url`, allowlisted) answers 429: A gets that
    429; a client of the default upstream is unaffected."""
    gw = gateways.start("openai", allow_base_urls=(mock_upstream,))
    encoded = base64.urlsafe_b64encode(mock_upstream.encode()).decode()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    status, _, answer = gw.chat(
        body,
        path=rollout_path(unique("d2e")) + f"/encoded_base_url/{encoded}",
        key="sk-client-a-own-key",
        headers={"x-mock-status": "429", "x-mock-error-code": "rate_limit_exceeded"},
    )
    assert status == 429, f"client A got {status}: {answer[:300]!r}"
    assert _error_message(answer) == "Rate limit reached for gpt-4o"

    status, _, answer = gw.chat(body, path="/project_id/p2" + rollout_path(unique("d2f")), key="sk-client-b")
    assert status == 200, f"client B got {status}: {answer[:300]!r}"
    assert json.loads(answer)["model"] == "gpt-4o"


# === 3. Two traces per completion in litellm mode ===


@pytest.mark.litellm
def test_defect3_one_trace_per_completion_litellm_mode(gateways, langfuse):
    """Three completions of one rollout through llmgate → LiteLLM: Langfuse holds three traces
    (LiteLLM's), and eval-protocol's LangfuseAdapter returns three rows, each ending with the
    answer."""
    from eval_protocol.adapters.langfuse import LangfuseAdapter

    gw = gateways.start("litellm")
    rollout = unique("d3")
    ids = []
    for i in range(3):
        status, headers, body = gw.chat(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": f"question {i}"}]},
            path=rollout_path(rollout, row_id=f"row-{i}"),
        )
        assert status == 200, body[:300]
        ids.append(headers.get("x-insertion-id") or headers.get("X-Insertion-Id"))
    traces = langfuse.reader().wait_traces([f"rollout_id:{rollout}"], at_least=3)
    names = sorted(t["name"] or "" for t in traces)
    assert len(traces) == 3, f"{len(traces)} traces for 3 completions: {names}"
    assert all(is_litellm_trace(t) for t in traces), names

    rows = LangfuseAdapter(client=langfuse.sdk()).get_evaluation_rows(
        tags=[f"rollout_id:{rollout}"], sleep_between_gets=0, max_retries=1
    )
    assert len(rows) == 3
    assert [final_answer(r.messages) for r in rows] == [MOCK_JSON_ANSWER] * 3


@pytest.mark.litellm
def test_defect3_fallback_event_joins_litellm_trace(gateways, langfuse):
    """A configured fallback in litellm mode: llmgate's `rate_limit_fallback` event goes into
    LiteLLM's trace of the completion; still one trace."""
    gw = gateways.start(
        "litellm",
        models=[
            {"name": "openai/fb-primary", "fallbacks": ["openai/fb-secondary"]},
            {"name": "openai/fb-secondary"},
        ],
    )
    rollout = unique("d3fb")
    status, _, body = gw.chat(
        {
            "model": "openai/fb-primary",
            "messages": [{"role": "user", "content": "hi"}],
            # LiteLLM sends `extra_headers` to the provider: the mock fails fb-primary only.
            "extra_headers": {"x-mock-fail": "fb-primary=429:rate_limit_exceeded"},
        },
        path=rollout_path(rollout),
    )
    assert status == 200, body[:300]
    traces = langfuse.reader().wait_traces([f"rollout_id:{rollout}"], at_least=1)
    summary = [[(o["type"], o["name"]) for o in t["observations"]] for t in traces]
    assert len(traces) == 1, f"{len(traces)} traces for one completion: {summary}"
    (trace,) = traces
    assert observations_named(trace, "rate_limit_fallback"), summary
    assert any(
        o["name"] == "litellm_request" and o["output"] and o["output"].get("content") == MOCK_JSON_ANSWER
        for o in trace["observations"]
    ), summary


# === 4. Streamed outputs recorded as empty in litellm mode ===


@pytest.mark.litellm
def test_defect4_streamed_output_recorded_litellm_mode(gateways, langfuse):
    """A streamed completion through llmgate → LiteLLM: what Langfuse holds for it has the
    assembled answer, and nothing records it as `[truncated by llmgate: 0 of N bytes]`."""
    gw = gateways.start("litellm")
    rollout = unique("d4")
    client = openai.OpenAI(base_url=gw.url + rollout_path(rollout), api_key="sk-client", max_retries=0, timeout=30)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "stream please"}], stream=True
        )
        if c.choices
    )
    assert text == MOCK_STREAM_ANSWER
    traces = langfuse.reader().wait_traces([f"rollout_id:{rollout}"], at_least=1)
    for t in traces:
        for value in [t["output"]] + [o["output"] for o in t["observations"]]:
            assert "truncated by llmgate: 0 of" not in json.dumps(value), f"{t['name']}: {value!r}"
    outputs = [o["output"] for t in traces for o in t["observations"] if o["type"] == "GENERATION" and o["output"]]
    assert {"role": "assistant", "content": MOCK_STREAM_ANSWER} in outputs, outputs


# === 5. openai mode: the trace output is the whole chat.completion body ===


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_defect5_openai_mode_trace_is_litellm_shaped(gateways, langfuse, stream):
    """openai mode: llmgate's trace has input = the request's messages and output = the
    assistant message (assembled for streams), as LiteLLM writes them, so eval-protocol's
    converters read the answer (a whole `chat.completion` body reads to them as
    `{"role": "assistant", "content": None}`)."""
    from eval_protocol.adapters.langfuse import LangfuseAdapter

    gw = gateways.start("openai")
    rollout = unique("d5")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    client = openai.OpenAI(base_url=gw.url + rollout_path(rollout), api_key="sk-client", max_retries=0, timeout=30)
    if stream:
        for _ in client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):
            pass
        answer = MOCK_STREAM_ANSWER
    else:
        client.chat.completions.create(model="gpt-4o", messages=messages)
        answer = MOCK_JSON_ANSWER
    (trace,) = langfuse.reader().wait_traces([f"rollout_id:{rollout}"], at_least=1)
    assert trace["output"] == {"role": "assistant", "content": answer}
    assert trace["input"] == messages

    rows = LangfuseAdapter(client=langfuse.sdk()).get_evaluation_rows(
        tags=[f"rollout_id:{rollout}"], sleep_between_gets=0, max_retries=1
    )
    assert len(rows) == 1
    assert [(m.role, m.content) for m in rows[0].messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", answer),
    ]
