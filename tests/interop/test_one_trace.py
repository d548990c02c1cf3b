"""One trace per completion in Langfuse, in both modes, JSON and streamed: a rollout of three
completions leaves three traces, one per insertion id, the insertion ids are the ones Redis
holds for the rollout, and eval-protocol's LangfuseAdapter reads three rows, each ending with
the answer."""

from __future__ import annotations

import openai
import pytest

from conftest import MOCK_JSON_ANSWER, MOCK_STREAM_ANSWER
from interop_support import final_answer, rollout_path, unique

COMPLETIONS = 3


@pytest.mark.parametrize(
    "mode,stream",
    [
        pytest.param("openai", False, id="openai-json"),
        pytest.param("openai", True, id="openai-stream"),
        pytest.param("litellm", False, id="litellm-json", marks=pytest.mark.litellm),
        pytest.param("litellm", True, id="litellm-stream", marks=pytest.mark.litellm),
    ],
)
def test_one_trace_per_completion(gateways, langfuse, redis_server, mode, stream):
    from eval_protocol.adapters.langfuse import LangfuseAdapter

    gw = gateways.start(mode)
    rollout = unique(f"one-{mode}")
    insertion_ids = set()
    for i in range(COMPLETIONS):
        client = openai.OpenAI(
            base_url=gw.url + rollout_path(rollout, row_id=f"row-{i}"), api_key="sk-client", max_retries=0, timeout=30
        )
        messages = [{"role": "user", "content": f"question {i}"}]
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == MOCK_STREAM_ANSWER
        else:
            assert raw.parse().choices[0].message.content == MOCK_JSON_ANSWER
        insertion_ids.add(raw.headers.get("x-insertion-id"))
    assert None not in insertion_ids and len(insertion_ids) == COMPLETIONS

    # Redis holds the rollout's insertion ids (SADD <rollout_id> <insertion_id>).
    assert redis_server.client(gw.redis_url).smembers(rollout) == insertion_ids

    traces = langfuse.reader().wait_traces([f"rollout_id:{rollout}"], at_least=COMPLETIONS)
    per_trace = [sorted(t.split(":", 1)[1] for t in tr["tags"] if t.startswith("insertion_id:")) for tr in traces]
    assert len(traces) == COMPLETIONS, f"{len(traces)} traces for {COMPLETIONS} completions: {per_trace}"
    assert sorted(ids[0] for ids in per_trace if len(ids) == 1) == sorted(insertion_ids), per_trace

    rows = LangfuseAdapter(client=langfuse.sdk()).get_evaluation_rows(
        tags=[f"rollout_id:{rollout}"], sleep_between_gets=0, max_retries=1
    )
    answer = MOCK_STREAM_ANSWER if stream else MOCK_JSON_ANSWER
    assert [final_answer(r.messages) for r in rows] == [answer] * COMPLETIONS
    assert sorted(r.input_metadata.row_id for r in rows) == [f"row-{i}" for i in range(COMPLETIONS)]
