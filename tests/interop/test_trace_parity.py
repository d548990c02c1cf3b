"""The fields eval-protocol reads compare equal between llmgate's `openai`-mode trace and
LiteLLM's own trace of the same call (LiteLLM called straight, with the tags llmgate would
inject), JSON and streamed.

What eval-protocol 0.3.33 reads of a trace (adapters/langfuse.py, adapters/fireworks_tracing.py,
adapters/utils.py): `input` and `output` (turned into messages by `extract_messages_from_data`),
`tags` (the rollout/invocation/experiment/run/row ids), `id`; and, only when input and output
give no message, the last GENERATION observation's `input`/`output`.
"""

from __future__ import annotations

import uuid

import openai
import pytest

from conftest import MOCK_JSON_ANSWER, MOCK_STREAM_ANSWER
from interop_support import is_litellm_trace, rollout_path, unique

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]


def _normalised_tags(tags: list[str]) -> list[str]:
    return ["insertion_id:*" if t.startswith("insertion_id:") else t for t in tags]


def _eval_protocol_view(langfuse, trace: dict) -> dict:
    """What eval-protocol makes of a trace, through both of its converters."""
    from eval_protocol.adapters.fireworks_tracing import convert_trace_dict_to_evaluation_row
    from eval_protocol.adapters.langfuse import convert_trace_to_evaluation_row

    def messages(row):
        return [m.model_dump(exclude_none=True) for m in row.messages] if row else None

    def ids(row):
        if not row:
            return None
        em = row.execution_metadata
        return (em.invocation_id, em.experiment_id, em.rollout_id, em.run_id, row.input_metadata.row_id)

    sdk_trace = langfuse.sdk().api.trace.get(trace["id"])  # TraceWithFullDetails, as LangfuseAdapter gets it
    lf_row = convert_trace_to_evaluation_row(sdk_trace)
    fw_row = convert_trace_dict_to_evaluation_row(trace)
    return {
        "input": trace["input"],
        "output": trace["output"],
        "tags": _normalised_tags(trace["tags"]),
        "langfuse_adapter_messages": messages(lf_row),
        "langfuse_adapter_ids": ids(lf_row),
        "fireworks_converter_messages": messages(fw_row),
        "fireworks_converter_ids": ids(fw_row),
    }


@pytest.mark.litellm
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_mode_trace_reads_like_litellm_trace(gateways, litellm, langfuse, stream):
    rollout = unique("parity")
    ids = dict(rollout_id=rollout, invocation_id="inv-1", experiment_id="exp-1", run_id="run-1", row_id="row-0")

    # LiteLLM's trace of the call, with the tags llmgate (and the original gateway) put in the body.
    litellm_insertion = str(uuid.uuid4())
    tags = [
        f"rollout_id:{rollout}",
        f"insertion_id:{litellm_insertion}",
        "invocation_id:inv-1",
        "experiment_id:exp-1",
        "run_id:run-1",
        "row_id:row-0",
    ]
    body = {"model": "gpt-4o", "messages": MESSAGES, "metadata": {"tags": tags}}
    if stream:
        body["stream"] = True
    status, _, answer = litellm.chat(body)
    assert status == 200, answer[:300]

    # llmgate's trace of the same call, openai mode.
    gw = gateways.start("openai")
    client = openai.OpenAI(base_url=gw.url + rollout_path(**ids), api_key="sk-client", max_retries=0, timeout=30)
    if stream:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == MOCK_STREAM_ANSWER
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        assert raw.parse().choices[0].message.content == MOCK_JSON_ANSWER
    llmgate_insertion = raw.headers.get("x-insertion-id")
    assert llmgate_insertion

    reader = langfuse.reader()
    (litellm_trace,) = reader.wait_traces([f"insertion_id:{litellm_insertion}"], at_least=1)
    assert is_litellm_trace(litellm_trace)
    (llmgate_trace,) = reader.wait_traces([f"insertion_id:{llmgate_insertion}"], at_least=1)

    reference = _eval_protocol_view(langfuse, litellm_trace)
    # The reference is what it should be: the messages and the answer.
    answer_text = MOCK_STREAM_ANSWER if stream else MOCK_JSON_ANSWER
    assert reference["langfuse_adapter_messages"] == MESSAGES + [{"role": "assistant", "content": answer_text}]
    assert reference["langfuse_adapter_ids"] == ("inv-1", "exp-1", rollout, "run-1", "row-0")

    view = _eval_protocol_view(langfuse, llmgate_trace)
    for key in reference:
        assert view[key] == reference[key], f"{key}: llmgate {view[key]!r} != LiteLLM {reference[key]!r}"
