"""LiteLLM's 400/401/429/500 reach the client through llmgate (`litellm` mode) with LiteLLM's
status and body. The provider (the mock) fails on LiteLLM's request: LiteLLM passes a body's
`extra_headers` on to the provider, and the mock answers `x-mock-status`."""

from __future__ import annotations

import json

import pytest

from interop_support import rollout_path, unique

pytestmark = pytest.mark.litellm


@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_litellm_error_reaches_client_with_status_and_body(gateways, litellm, status):
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "extra_headers": {"x-mock-status": str(status), "x-mock-retry-after": "0"},
    }
    ref_status, _, ref_body = litellm.chat(body)
    assert ref_status == status, ref_body[:300]
    reference = json.loads(ref_body)["error"]

    gw = gateways.start("litellm")
    got_status, _, got_body = gw.chat(body, path=rollout_path(unique(f"err{status}")))
    assert got_status == status, got_body[:400]
    got = json.loads(got_body)["error"]
    assert (got.get("message"), got.get("type"), got.get("code")) == (
        reference.get("message"),
        reference.get("type"),
        reference.get("code"),
    )
