"""The OpenAI Python SDK against Tether's Responses API: a background response with web
search, cancelled; then one whose stream is dropped and resumed from the last sequence
number seen. Run `make run` in another shell first; then
`uv run --group test python examples/responses_sdk.py`."""

from __future__ import annotations

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")

# Background with web search: the Response comes back at once, queued, before any search.
started = client.responses.create(
    model="local",
    input="How does Tether cancel a web search?",
    tools=[{"type": "web_search"}],
    background=True,
)
print(started.id, started.status)  # resp_... queued
cancelled = client.responses.cancel(started.id)  # closes every connection of it
print(cancelled.status, repr(cancelled.output_text))  # cancelled, the partial answer

# A stream dropped after a few events, resumed from the last sequence number seen.
response = client.responses.create(
    model="local", input="What is structured concurrency?", background=True
)
last = -1
for event in client.responses.retrieve(response.id, stream=True):
    last = event.sequence_number
    if event.type == "response.output_text.delta":
        break  # the connection drops here
for event in client.responses.retrieve(response.id, stream=True, starting_after=last):
    if event.type == "response.output_text.delta":
        print(event.delta, end="", flush=True)
print()
print(client.responses.retrieve(response.id).status)  # completed
