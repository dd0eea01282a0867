"""The simulator's replay mode: a queued real OpenRouter answer (``tests/recordings/``) is what the
next chat completion gets, byte for byte and event by event, and ``/generation`` then reports the
recording's own id, tokens and money. Also checks the corpus against its manifest and README."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from openrouter_sim import OpenRouterSimulator, Recording, replayed_generation
from tests.recorded_replies import CORPUS, README, CorpusEntry

KEY = "sk-or-v1-0123456789abcdefreplaytest"
AUTH = {"Authorization": f"Bearer {KEY}"}
TITLE_TASK = (
    '### Task:\nGenerate a concise title for the chat.\n### Output:\nJSON format: { "title": "x" }\n'
    "### Chat History:\n<chat_history>\nUSER: hello\n</chat_history>"
)
BY_NAME = {entry.name: entry for entry in CORPUS}


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator(host="127.0.0.1", port=0) as simulator:
        yield simulator


@pytest.fixture
def client(sim: OpenRouterSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=10) as c:
        yield c


def chat_body(text: str = "hello", *, stream: bool = False) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}], "stream": stream}


def raw_post(sim: OpenRouterSimulator, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """POST /chat/completions over a bare socket: (the status line and headers, the raw body as
    framed on the wire, chunked encoding included)."""
    payload = json.dumps(body).encode()
    request = (
        f"POST /api/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as conn:
        conn.sendall(request)
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest


def dechunk(framed: bytes) -> list[bytes]:
    """The HTTP chunks of a chunked body, in order, without the terminating empty chunk."""
    chunks: list[bytes] = []
    while True:
        size_line, _, framed = framed.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert framed == b"\r\n", "nothing after the last chunk"
            return chunks
        chunks.append(framed[:size])
        assert framed[size : size + 2] == b"\r\n"
        framed = framed[size + 2 :]


# ---- byte for byte ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: e.name)
def test_every_recording_is_served_byte_for_byte(sim: OpenRouterSimulator, entry: CorpusEntry) -> None:
    """Proves: status, Content-Type and body are the recording's; a stream is sent one recorded
    event per HTTP chunk (comments and `[DONE]` included), which join to the recorded body."""
    sim.replay_next(entry.recording)
    head, framed = raw_post(sim, chat_body(stream=entry.stream))
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert status_line.split(" ")[1] == str(entry.recording.status)
    assert headers["content-type"] == entry.recording.content_type
    if entry.recording.streamed:
        assert headers["transfer-encoding"] == "chunked"
        chunks = dechunk(framed)
        assert chunks == entry.recording.events()
        assert b"".join(chunks) == entry.recording.body
        assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    else:
        assert int(headers["content-length"]) == len(entry.recording.body)
        assert framed == entry.recording.body
    assert sim.pending_replays() == 0


def test_a_stream_is_parsed_by_an_http_client_as_recorded(
    sim: OpenRouterSimulator, client: httpx.Client
) -> None:
    entry = BY_NAME["stream_reasoning_claude"]
    sim.replay_next(entry.recording)
    with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response:
        received = b"".join(response.iter_raw())
    assert received == entry.recording.body


# ---- the queue ----------------------------------------------------------------------------------


def test_replays_are_taken_in_order_then_the_simulator_answers_again(
    sim: OpenRouterSimulator, client: httpx.Client
) -> None:
    first, second = BY_NAME["nonstream_cost_gpt35"].recording, BY_NAME["error_401_no_auth"].recording
    sim.replay_next(first, second)
    assert sim.pending_replays() == 2
    answers = [client.post("/chat/completions", json=chat_body(f"turn {i}")) for i in range(3)]
    assert [a.content for a in answers[:2]] == [first.body, second.body]
    assert [a.status_code for a in answers] == [200, 401, 200]
    simulated = answers[2].json()
    assert simulated["id"].startswith("gen-") and simulated["id"] != "gen-1766869643-Y7jSlzbFQmNWLFiftVlM"
    served = sim.served_replays
    assert [s.recording for s in served] == [first, second]
    assert [s.request.body["messages"][0]["content"] for s in served] == ["turn 0", "turn 1"]
    assert [s.generation_id for s in served] == ["gen-1766869643-Y7jSlzbFQmNWLFiftVlM", None]
    assert sim.pending_replays() == 0


def test_title_and_tag_requests_and_requests_without_a_key_take_no_replay(
    sim: OpenRouterSimulator, client: httpx.Client
) -> None:
    recording = BY_NAME["nonstream_cost_gpt35"].recording
    sim.replay_next(recording)
    task = client.post("/chat/completions", json=chat_body(TITLE_TASK))
    assert task.status_code == 200 and task.content != recording.body
    anonymous = httpx.post(f"{sim.base_url}/chat/completions", json=chat_body(), timeout=10)
    assert anonymous.status_code == 401 and anonymous.content != recording.body
    assert sim.pending_replays() == 1 and sim.served_replays == []
    assert client.post("/chat/completions", json=chat_body()).content == recording.body


def test_clear_drops_queued_and_served_replays(sim: OpenRouterSimulator, client: httpx.Client) -> None:
    sim.replay_next(BY_NAME["nonstream_cost_gpt35"].recording)
    client.post("/chat/completions", json=chat_body())
    sim.replay_next(BY_NAME["error_404_no_endpoints"].recording)
    sim.clear()
    assert sim.pending_replays() == 0 and sim.served_replays == [] and sim.generations == {}
    assert client.post("/chat/completions", json=chat_body()).status_code == 200


# ---- /generation agrees with the recording ------------------------------------------------------


@pytest.mark.parametrize("entry", [e for e in CORPUS if e.expect.cost is not None], ids=lambda e: e.name)
def test_generation_lookup_reports_the_recordings_own_bill(
    sim: OpenRouterSimulator, client: httpx.Client, entry: CorpusEntry
) -> None:
    """Proves: after a replay `/generation?id=<the recording's id>` gives its cost to the digit,
    its tokens and its BYOK flag, so a reconciliation of the replayed reply finds no difference."""
    sim.replay_next(entry.recording)
    client.post("/chat/completions", json=chat_body(stream=entry.stream)).read()
    expect = entry.expect
    lookup = client.get("/generation", params={"id": expect.generation_id})
    assert lookup.status_code == 200
    data = json.loads(lookup.text, parse_float=Decimal)["data"]
    assert data["id"] == expect.generation_id and data["streamed"] is entry.stream
    assert Decimal(data["total_cost"]) == expect.cost and data["is_byok"] is expect.is_byok
    upstream = data["upstream_inference_cost"]
    assert (None if upstream is None else Decimal(upstream)) == expect.upstream_inference_cost
    assert (data["tokens_prompt"], data["tokens_completion"]) == (
        expect.prompt_tokens,
        expect.completion_tokens,
    )
    assert (data["native_tokens_reasoning"], data["native_tokens_cached"]) == (
        expect.reasoning_tokens,
        expect.cached_tokens,
    )
    record = sim.generations[expect.generation_id]
    assert record.spend == expect.spend and record.api_key == KEY
    key = client.get("/key").json()["data"]
    assert Decimal(str(key["usage"])) == expect.cost


@pytest.mark.parametrize(
    "name", ["nonstream_tool_call_no_cost", "error_401_no_auth", "error_404_no_endpoints"]
)
def test_a_reply_without_a_cost_or_an_error_is_no_priced_generation(
    sim: OpenRouterSimulator, client: httpx.Client, name: str
) -> None:
    """Proves: the simulator invents no bill: a reply that carries no cost, or an error before any
    generation, is not kept, and looking its id up finds nothing."""
    sim.replay_next(BY_NAME[name].recording)
    client.post("/chat/completions", json=chat_body())
    assert sim.generations == {}
    assert client.get("/generation", params={"id": "gen-1762047030-dJUcJW4ildNGqK4UV6iJ"}).status_code == 404


def test_a_byok_reply_is_billed_cost_plus_upstream() -> None:
    """A constructed reply (not a recording: no public BYOK recording was found, see the README):
    BYOK spend is `cost + upstream_inference_cost`, read from the reply's own literals."""
    body = (
        b'{"id":"gen-1700000000-AAAAAAAAAAAAAAAAAAAA","object":"chat.completion","provider":"OpenAI",'
        b'"model":"openai/gpt-4o-mini","choices":[{"index":0,"finish_reason":"stop","message":'
        b'{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":8,"completion_tokens":16,'
        b'"cost":0.0000044,"is_byok":true,"cost_details":{"upstream_inference_cost":0.000088}}}'
    )
    record = replayed_generation(Recording(body), {"model": "openai/gpt-4o-mini"}, {}, 0.0)
    assert record is not None and record.is_byok
    assert (record.cost, record.upstream_inference_cost) == (Decimal("0.0000044"), Decimal("0.000088"))
    assert record.spend == Decimal("0.0000924")


def test_a_stream_is_only_looked_up_once_its_last_event_was_sent() -> None:
    """The stream's generation is kept when the stream ends (like OpenRouter's, which cannot be
    looked up mid-stream); a JSON reply's before it is sent."""
    entry = BY_NAME["stream_cost_bedrock"]
    record = replayed_generation(entry.recording, chat_body(stream=True), {}, 1.0)
    assert record is not None and record.streamed and record.created_at == 1.0
    assert record.finish_reason == "stop" and record.provider == "Amazon Bedrock"


# ---- the corpus agrees with its manifest and README ----------------------------------------------


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: e.name)
def test_the_manifest_says_what_the_recording_says(entry: CorpusEntry) -> None:
    """The expected figures are read from the recorded body itself (the last usage object), so a
    typo in the manifest fails here rather than in the end-to-end replay."""
    assert entry.recording.streamed is entry.stream
    payloads = [p for p in entry.recording.payloads() if isinstance(p, dict)]
    assert payloads, "the body holds at least one JSON payload"
    expect = entry.expect
    if entry.recording.status >= 400:
        assert all("error" in p for p in payloads) and expect.status == "error"
        assert not expect.generation_id and expect.cost is None and expect.spend == 0
        assert expect.error.startswith(f"HTTP {entry.recording.status}: ")
        assert expect.error.removeprefix(f"HTTP {entry.recording.status}: ") in json.dumps(payloads)
        return
    assert {p["id"] for p in payloads} == {expect.generation_id}
    (usage,) = [p["usage"] for p in payloads if p.get("usage")][-1:]
    cost = usage.get("cost")
    assert (None if cost is None else Decimal(str(cost))) == expect.cost
    details = usage.get("cost_details") or {}
    upstream = details.get("upstream_inference_cost")
    assert (None if upstream is None else Decimal(str(upstream))) == expect.upstream_inference_cost
    assert bool(usage.get("is_byok")) is expect.is_byok
    assert expect.spend == (expect.cost or 0) + (expect.upstream_inference_cost or 0 if expect.is_byok else 0)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        expect.prompt_tokens,
        expect.completion_tokens,
    )
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert (reasoning, cached) == (expect.reasoning_tokens, expect.cached_tokens)
    assert (expect.status == "error") is any("error" in p for p in payloads)


def test_the_readme_table_lists_every_recording_with_its_source() -> None:
    text = README.read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", text, re.MULTILINE)}
    assert set(rows) == set(BY_NAME)
    for name, row in rows.items():
        source = BY_NAME[name].source
        assert source["repository"] in row and source["commit"][:12] in row and source["licence"] in row
        assert BY_NAME[name].expect.generation_id in row
        assert source["path"] in text
