"""The official `openai` client against a live `serve` whose key `sk-limited` may make 2
requests a minute: success carries OpenAI's `x-ratelimit-*` headers, and the third request
raises the client's own `RateLimitError` with `rate_limit_exceeded`, the limit named and a
`Retry-After` it can honour. Run by deploy/check.sh.

    python deploy/openai_client_check.py URL
"""
import sys

import openai

url = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=url + "/v1", api_key="sk-limited", max_retries=0)
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Say hi."}]
for left in (1, 0):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=2)
    h = raw.headers
    assert h["x-ratelimit-limit-requests"] == "2", dict(h)
    assert h["x-ratelimit-remaining-requests"] == str(left), dict(h)
    assert h["x-ratelimit-reset-requests"].endswith("s"), dict(h)
    completion = raw.parse()
    assert completion.usage.completion_tokens >= 1
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    sys.exit("openai_client_check: the third request in a minute was not refused")
except openai.RateLimitError as e:
    assert e.status_code == 429
    assert e.code == "rate_limit_exceeded", e.body
    assert e.type == "requests", e.body
    assert "requests per minute (RPM): limit 2" in e.message, e.message
    after = int(e.response.headers["retry-after"])
    assert 1 <= after <= 60, after
    print(f"openai_client_check: RateLimitError {e.code} ({e.type}), Retry-After {after} s; success headers as OpenAI's")
