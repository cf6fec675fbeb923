"""serving/: request parsing and validation, media fetching, metrics text and response shapes, without a
model or an HTTP server of ours (the live server is tests/integration/test_serve.py)."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from smolvlm.serving import schemas
from smolvlm.generation.text_stream import AnswerText
from smolvlm.serving.errors import APIError
from smolvlm.serving.media import MediaLimits, fetch, load_image_ref, load_media
from smolvlm.serving.metrics import ServerMetrics
from smolvlm.serving.parse import MediaRef, Sampling, generation_kwargs, parse_chat_request
from tests.helpers import make_image

CTX = 1024
USER = [{"role": "user", "content": "hi"}]


def parse(**body):
    return parse_chat_request({"messages": USER, **body}, served_model="m", max_context=CTX)


def rejected(body, status: int = 400) -> APIError:
    with pytest.raises(APIError) as e:
        parse_chat_request(body, served_model="m", max_context=CTX)
    assert e.value.status == status
    assert e.value.body()["error"]["message"] == e.value.message and "Traceback" not in e.value.message
    return e.value


def png_uri(w: int = 20, h: int = 10) -> str:
    buf = io.BytesIO()
    make_image(w, h, 0).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- parsing ------------------------------------------------------------------------------------------
def test_messages_become_roles_and_parts_in_order():
    req = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}},
                                     {"type": "video_url", "video_url": "data:y"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
    ]}, served_model="m", max_context=CTX)
    assert [m.role for m in req.messages] == ["system", "user", "assistant"]
    assert req.messages[0].parts == ("be brief",)
    assert req.messages[1].parts == ("a", MediaRef("image", "data:x", "messages[1].content[1]"),
                                     MediaRef("video", "data:y", "messages[1].content[2]"))
    assert [r.kind for r in req.media] == ["image", "video"]
    assert req.sampling == Sampling() and not req.stream and not req.include_usage


def test_sampling_fields():
    req = parse(max_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop="END", n=1, stream=True,
                stream_options={"include_usage": True}, top_k=20, repetition_penalty=1.1)
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.top_k) == (5, 0.7, 0.9, 3, ("END",), 20)
    assert req.stream and req.include_usage
    assert parse(max_completion_tokens=7, max_tokens=9).sampling.max_tokens == 7  # the newer name wins
    assert parse(stop=["a", "b", "a"]).sampling.stop == ("a", "b")
    assert parse(max_tokens=4.0).sampling.max_tokens == 4  # JSON clients may send 4.0


@pytest.mark.parametrize("body, param", [
    ([1, 2], None),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),  # a lone surrogate
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ({"messages": USER, "stop": ["\ud800"]}, "stop"),
    ({"messages": USER, "model": 3}, "model"),
    ({"messages": USER, "max_tokens": -1}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 10**12}, "max_tokens"),
    ({"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "seed": 1.5}, "seed"),
    ({"messages": USER, "seed": 2**64}, "seed"),
    ({"messages": USER, "stop": 3}, "stop"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "stop": ["x"] * 17}, "stop"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": []}, "stream_options"),
    ({"messages": USER, "stream_options": {"include_usage": 1}}, "include_usage"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_requests_are_400_naming_the_field(body, param):
    assert rejected(body).param == param


def test_unknown_model_is_404_and_defaults_pass():
    e = rejected({"messages": USER, "model": "gpt-4o"}, 404)
    assert e.code == "model_not_found" and "'m'" in e.message
    # no-ops OpenAI clients send are accepted
    parse(frequency_penalty=0, presence_penalty=0.0, tool_choice="none", response_format={"type": "text"}, user="u",
          logprobs=False, model=None)


def test_generation_kwargs():
    assert generation_kwargs(Sampling(), prompt_tokens=100, max_context=1024) == dict(
        max_new_tokens=924, seed=None, stop_strings=[])  # greedy, the rest of the context
    kw = generation_kwargs(Sampling(max_tokens=8, temperature=0.5, top_p=0.9, seed=1, stop=("x",)), 10, 1024)
    assert kw == dict(max_new_tokens=8, seed=1, stop_strings=["x"], do_sample=True, temperature=0.5, top_p=0.9,
                      min_p=None, top_k=0)  # OpenAI sampling: no top-k unless asked
    assert generation_kwargs(Sampling(temperature=0.0, top_p=0.5), 10, 1024).get("do_sample") is None


def test_answer_text_drops_leading_whitespace_only():
    strip = AnswerText()
    assert [strip(p) for p in ["", " ", " Hello", " world", "  "]] == ["", "", "Hello", " world", "  "]


# -- media -----------------------------------------------------------------------------------------------
LIMITS = MediaLimits(max_bytes=4096, timeout_s=2.0, allow_remote=False)


def ref(url: str, kind: str = "image") -> MediaRef:
    return MediaRef(kind, url, "messages[0].content[0]")  # type: ignore[arg-type]


def media_error(url: str, limits: MediaLimits = LIMITS, kind: str = "image") -> APIError:
    with pytest.raises(APIError) as e:
        load_media([ref(url, kind)], limits, processor=None)
    assert e.value.status == 400 and e.value.param == "messages[0].content[0]"
    return e.value


def test_data_uri_images_decode_once_per_url():
    uri = png_uri()
    out = load_media([ref(uri), MediaRef("image", uri, "elsewhere")], LIMITS, processor=None)
    assert list(out) == [("image", uri)] and out["image", uri].size == (20, 10)
    assert fetch(ref("data:image/png;base64,aGVs\nbG8="), LIMITS) == b"hello"  # line breaks are allowed


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,not base64!", "invalid_media"),
    ("data:image/png,rawtext", "invalid_media"),
    ("data:image/png;base64,", "invalid_media"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
    ("data:image/png;base64," + "A" * 8000, "media_too_large"),
    ("file:///etc/passwd", "invalid_media"),
    ("/etc/passwd", "invalid_media"),
    ("ftp://example.com/x.png", "invalid_media"),
    ("http://127.0.0.1:9/x.png", "remote_media_disabled"),
    ("https://example.com/x.png", "remote_media_disabled"),
])
def test_bad_media_is_400(url, code):
    assert media_error(url).code == code


def test_undecodable_video_is_400():
    class Proc:
        def load_video(self, path):  # what processor.load_video raises for a file FFmpeg cannot read
            from smolvlm.processing.video import VideoError
            raise VideoError(f"cannot open video {path}: Invalid data")

    with pytest.raises(APIError) as e:
        load_media([ref("data:video/mp4;base64,AAAA", "video")], LIMITS, Proc())
    assert e.value.code == "invalid_video" and "/tmp" not in e.value.message


class _Files(BaseHTTPRequestHandler):
    """A local web server: /img.png, /big (a large Content-Length), /chunked-big, /to-file, /slow."""

    png = b""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/chunked-big":  # no Content-Length: the limit is found while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"x" * 1000)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_response(404)
            self.end_headers()


@contextlib.contextmanager
def web_server():
    _Files.png = base64.b64decode(png_uri().split(",", 1)[1])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_media_when_allowed():
    limits = MediaLimits(max_bytes=4096, timeout_s=1.0, allow_remote=True)
    with web_server() as url:
        assert load_image_ref(ref(f"{url}/img.png"), limits).size == (20, 10)
        assert media_error(f"{url}/big", limits).code == "media_too_large"
        assert media_error(f"{url}/chunked-big", limits).code == "media_too_large"
        assert media_error(f"{url}/to-file", limits).code == "media_fetch_failed"
        assert media_error(f"{url}/missing", limits).code == "media_fetch_failed"
        e = media_error(f"{url}/slow", limits)  # 10 s of trickle against a 1 s deadline
        assert e.code == "media_fetch_failed" and "longer than 1 s" in e.message


# -- responses and metrics ---------------------------------------------------------------------------------
def test_chunk_shapes():
    ids = schemas.Ids("chatcmpl-1", 5, "m")
    c = schemas.chunk(ids, {"content": "x"})
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"} and "usage" not in c
    assert schemas.chunk(ids, {"content": "x"}, include_usage=True)["usage"] is None
    last = schemas.chunk(ids, None, include_usage=True, usage_=schemas.usage(3, 4))
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert schemas.sse("[DONE]") == "data: [DONE]\n\n"
    assert schemas.sse({"a": "é"}) == 'data: {"a": "é"}\n\n'


def test_metrics_text():
    m = ServerMetrics()
    m.response("/v1/chat/completions", 200)
    m.response("/v1/chat/completions", 400)
    m.response("/no/such/route", 404)
    m.submitted(12)
    m.answered(completion_tokens=5, ttft_s=0.2, total_s=0.6)  # 0.1 s per token after the first
    engine = dict(stop=1, length=2, cancelled=3, error=0, generated_tokens=9, waiting=1, active_rows=2, pending_rows=1,
                  max_batch=4,
                  max_context=1024, vision_encoder_calls=7, feature_cache_hits=5, feature_cache_misses=8,
                  prefills=6, prefill_forwards=4, prefill_chunks=2, decode_steps=30, rejected=1)
    text = m.render(engine)
    for line in ['smolvlm_http_responses_total{route="/v1/chat/completions",status="400"} 1',
                 'smolvlm_http_responses_total{route="other",status="404"} 1',
                 'smolvlm_requests_finished_total{reason="cancelled"} 3',
                 "smolvlm_prompt_tokens_total 12", "smolvlm_completion_tokens_total 9",
                 "smolvlm_queue_depth 1", "smolvlm_batch_size 2", "smolvlm_pending_requests 1",
                 "smolvlm_vision_encoder_calls_total 7",
                 "smolvlm_feature_cache_hits_total 5", "smolvlm_prefill_forwards_total 4",
                 'smolvlm_time_to_first_token_seconds_bucket{le="0.1"} 0',
                 'smolvlm_time_to_first_token_seconds_bucket{le="0.25"} 1',
                 'smolvlm_time_per_output_token_seconds_bucket{le="0.1"} 1',
                 "smolvlm_time_per_output_token_seconds_count 1"]:
        assert line in text.splitlines(), line
    for line in text.splitlines():  # the exposition format: comments, or "name{labels} value"
        assert line.startswith("# ") or (line.startswith("smolvlm_") and float(line.rsplit(" ", 1)[1]) >= 0), line


# -- one request's events -> SSE / JSON (a hand-fed handle, no engine) --------------------------------------
def _run(events, include_usage: bool = False):
    import asyncio

    from smolvlm.generation.requests import RequestHandle
    from smolvlm.serving.completions import Running

    handle = RequestHandle("chatcmpl-x", 5, _wake=lambda: None)
    for ev in events:
        handle._emit(ev)
    return Running.start(handle, "m", include_usage, ServerMetrics()), asyncio


def _sse(events, include_usage: bool = False) -> list:
    import json

    from smolvlm.serving.completions import sse_events

    run, asyncio = _run(events, include_usage)

    async def collect():
        return [e async for e in sse_events(run)]

    out = asyncio.run(collect())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in out)
    return [e[6:-2] if e == "data: [DONE]\n\n" else json.loads(e[6:]) for e in out]


def _json(events):
    from smolvlm.serving.completions import json_answer

    run, asyncio = _run(events)

    async def never_disconnects():
        await asyncio.Event().wait()

    return asyncio.run(json_answer(run, never_disconnects))


def test_sse_and_json_from_the_same_events():
    from smolvlm.generation.requests import FinishEvent, TokenEvent

    evs = [TokenEvent(1, 0, " Hel"), TokenEvent(2, 1, ""), TokenEvent(3, 2, "lo"), FinishEvent("stop", 5, 3, 0.1, 0.3, "!")]
    out = _sse(evs, include_usage=True)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in out[1:-3]] == ["Hel", "lo", "!"]  # no empty chunks
    assert out[-3]["choices"][0]["finish_reason"] == "stop" and out[-2]["choices"] == []
    assert out[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8} and out[-1] == "[DONE]"
    body = _json(evs)
    assert body["choices"][0]["message"]["content"] == "Hello!" and body["usage"]["total_tokens"] == 8


def test_engine_failures_are_errors_without_details():
    from smolvlm.generation.requests import FinishEvent, TokenEvent

    failed = [TokenEvent(1, 0, "a"), FinishEvent("error", 5, 1, 0.1, 0.2, error="RuntimeError: secret internals")]
    out = _sse(failed)
    assert out[-2]["error"]["code"] == "generation_failed" and "secret" not in str(out) and out[-1] == "[DONE]"
    with pytest.raises(APIError) as e:
        _json(failed)
    assert e.value.status == 500 and "secret" not in e.value.message
    with pytest.raises(APIError) as e:
        _json([FinishEvent("cancelled", 5, 0, None, 0.1)])  # the engine stopped under it
    assert e.value.status == 503
