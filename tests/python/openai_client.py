"""Drives the router's OpenAI-compatible HTTP API with the official `openai` client
(tests/openai.rs runs it). Usage: openai_client.py SCENARIO BASE_URL [API_KEY]

Each scenario asserts what it checks and prints one JSON line of what the Rust side checks
further; a failed assertion exits non-zero with its traceback."""

import json
import sys
import threading
import time

import httpx2
import openai

scenario, base = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"


def client(**kw):
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=base + "/v1", api_key=kw.pop("api_key", key), **kw)


def out(**kw):
    print(json.dumps(kw), flush=True)


def suite():
    c = client()
    models = [m.id for m in c.models.list().data]
    assert len(models) == 1, models
    model = models[0]

    # Completions, unary and streamed with usage: the same greedy text and counts.
    unary = c.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0)
    assert unary.object == "text_completion"
    assert unary.choices[0].finish_reason in ("length", "stop"), unary
    assert unary.usage.completion_tokens >= 1
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    chunks = list(
        c.completions.create(
            model=model, prompt="Hello there", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens
    streamed = "".join(ch.choices[0].text for ch in chunks[:-1])
    assert streamed == unary.choices[0].text, (streamed, unary.choices[0].text)
    assert chunks[-2].choices[0].finish_reason == unary.choices[0].finish_reason

    # Chat, unary and streamed: a role chunk first, the same text, a finish reason, usage.
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    chat = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        c.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason
    # Without include_usage there is no usage chunk.
    plain = list(c.chat.completions.create(model=model, messages=messages, max_tokens=3, stream=True))
    assert all(ch.choices for ch in plain), plain[-1]

    # The same conversation again: its full prompt blocks come from the worker's prefix cache.
    again = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens, again.usage

    # The rendered prompt's ids, for the gRPC comparison.
    tok = httpx2.post(base + "/tokenize", json={"model": model, "messages": messages}).json()
    assert tok["count"] == chat.usage.prompt_tokens, (tok, chat.usage)

    # n=2: two choices, indexed.
    two = c.completions.create(model=model, prompt="Once", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert sorted(ch.index for ch in two.choices) == [0, 1], two
    assert two.usage.completion_tokens >= 2, two.usage
    two_chat = c.chat.completions.create(model=model, messages=messages, max_tokens=4, n=2)
    assert len(two_chat.choices) == 2

    # The same seed gives the same text.
    same = [
        c.completions.create(model=model, prompt="A seed", max_tokens=12, temperature=1.0, seed=42)
        .choices[0].text
        for _ in range(2)
    ]
    assert same[0] == same[1], same

    # A stop string ends the text before it.
    full = c.completions.create(model=model, prompt="Stop here", max_tokens=16, temperature=0,
                                extra_body={"ignore_eos": True})
    ftext = full.choices[0].text
    stop = next(
        (ftext[i:i + 2] for i in range(2, len(ftext) - 2) if ftext[i:i + 2].strip()), None
    )
    assert stop, ftext
    cut = c.completions.create(model=model, prompt="Stop here", max_tokens=16, temperature=0,
                               stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == ftext[: ftext.index(stop)], (cut.choices[0].text, ftext, stop)
    assert cut.choices[0].finish_reason == "stop"

    # Log-probabilities: one entry per generated token, with the alternatives asked for.
    lp = c.completions.create(model=model, prompt="Log", max_tokens=5, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True})
    l = lp.choices[0].logprobs
    assert len(l.tokens) == len(l.token_logprobs) == lp.usage.completion_tokens == 5, l
    assert all(len(t) <= 2 and len(t) >= 1 for t in l.top_logprobs), l
    assert all(v <= 0 for v in l.token_logprobs)
    chat_lp = c.chat.completions.create(model=model, messages=messages, max_tokens=4, logprobs=True,
                                        top_logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    content = chat_lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content), content
    # Greedy: the chosen token is the most likely one.
    assert all(e.logprob >= max(t.logprob for t in e.top_logprobs) - 1e-4 for e in content)

    # echo puts the prompt first.
    echoed = c.completions.create(model=model, prompt="Echo me", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("Echo me"), echoed

    # Extensions pass through the client's extra_body.
    ext = c.completions.create(model=model, prompt="x", max_tokens=4, temperature=0.8,
                               extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                           "priority": 1})
    assert ext.usage.completion_tokens >= 1

    # Refusals: an unsupported field (400, named), an unknown model (404).
    try:
        c.chat.completions.create(model=model, messages=messages, response_format={"type": "json_object"})
        raise AssertionError("response_format was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "response_format", e.body
    try:
        c.completions.create(model=model, prompt="x", max_tokens=2, logit_bias={"1": 5})
        raise AssertionError("logit_bias was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "logit_bias", e.body
    try:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.body["param"] == "model", e.body

    out(model=model, chat_text=chat.choices[0].message.content, chat_tokens=chat.usage.completion_tokens,
        prompt_ids=tok["tokens"])


def auth():
    """A key of the tenants file works, another is 401; a priority over the cap is 403."""
    good = client()
    r = good.completions.create(prompt="x", max_tokens=2, model="")
    assert r.usage.completion_tokens >= 1
    try:
        client(api_key="sk-wrong").completions.create(prompt="x", max_tokens=2, model="")
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
    try:
        good.completions.create(prompt="x", max_tokens=2, model="", extra_body={"priority": 9})
        raise AssertionError("a priority over the cap was accepted")
    except openai.PermissionDeniedError as e:
        assert e.status_code == 403 and e.body["param"] == "priority", e.body
    out(ok=True)


def retry():
    """A tenant with max_concurrent 1: while one stream runs, a second request gets 429 with
    retry-after-ms; the client waits that long, retries, and succeeds once the stream ends."""
    attempts = []

    def seen(response):
        attempts.append((time.monotonic(), response.status_code, response.headers.get("retry-after-ms"),
                         response.headers.get("retry-after")))

    stream = client().completions.create(model="", prompt="hold", max_tokens=40, stream=True,
                                         extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices, first
    drained = threading.Thread(target=lambda: [None for _ in stream])
    drained.start()
    patient = client(max_retries=20, http_client=httpx2.Client(event_hooks={"response": [seen]}))
    r = patient.completions.create(model="", prompt="wait", max_tokens=2)
    drained.join()
    assert r.usage.completion_tokens >= 1
    statuses = [a[1] for a in attempts]
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    t0, _, ms, secs = attempts[0]
    assert ms is not None and secs is not None, attempts
    gap = attempts[1][0] - t0
    assert gap >= float(ms) / 1000 * 0.9, (gap, ms)
    out(statuses=statuses, retry_after_ms=int(ms), gap_s=gap)


def disconnect():
    """Reads a few chunks of a long stream, then hangs up."""
    stream = client().completions.create(model="", prompt="long", max_tokens=1500, stream=True,
                                         extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    out(closed=True)


def midstream():
    """A long stream whose router is stopped under it: the client gets an error event."""
    stream = client().completions.create(model="", prompt="long", max_tokens=1500, stream=True,
                                         extra_body={"ignore_eos": True})
    n = 0
    try:
        for _ in stream:
            n += 1
            if n == 3:
                out(streaming=True)
        raise AssertionError("the stream ended without an error")
    except openai.APIError as e:
        out(error=str(e), chunks=n)


def tls():
    """Over TLS, trusting only the CA in OPENINFER_TEST_CA."""
    import os

    c = client(http_client=httpx2.Client(verify=os.environ["OPENINFER_TEST_CA"]))
    r = c.completions.create(model="", prompt="x", max_tokens=3)
    assert r.usage.completion_tokens >= 1, r
    try:
        client().completions.create(model="", prompt="x", max_tokens=3)
        raise AssertionError("a client that does not trust the CA got through")
    except openai.APIConnectionError:
        pass
    out(ok=True)


{"suite": suite, "tls": tls, "auth": auth, "retry": retry, "disconnect": disconnect, "midstream": midstream}[scenario]()
