"""The web chat page (src/smolvlm/serving/static/index.html), driven in a real headless Chromium.

The first tests serve the real page from a small stand-in server written here (stdlib
http.server: canned SSE answers, a 400 error for an image that is not one, a slow answer to stop),
so they pin the page's side of the wire format on their own. The last one starts the real
`smolvlm serve` on a tiny checkpoint and goes through the same steps against it.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`); a missing
browser fails the test with that command, it is never skipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests._video_fixtures import encode_format
from tests.conftest import REPO
from tests.helpers import build_tiny_checkpoint, serve_command

PAGE = REPO / "src" / "smolvlm" / "serving" / "static" / "index.html"
SHAPES = REPO / "examples" / "shapes.png"
WAIT_S = 20  # the longest any single wait in these tests may take
STATS_RE = re.compile(r"^\d+\.\d\d s to first token · \d+\.\d tokens/s · \d+ tokens$")
INSTALL_HINT = (
    "the web page test needs Chromium, its driver and Selenium: run `bash tools/install-chromium.sh` "
    "(apt-get install chromium chromium-driver) and `.venv/bin/pip install -c constraints.txt -e '.[test]'`, "
    "as the README's test command does"
)


# ---- the browser -------------------------------------------------------------------------------

def _find(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole session, always quit; missing pieces fail loudly."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}); {INSTALL_HINT}")
    chrome = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if not chrome or not driver_path:
        missing = " and ".join(n for n, p in (("chromium", chrome), ("chromedriver", driver_path)) if not p)
        pytest.fail(f"{missing} not found on PATH; {INSTALL_HINT}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome  # with both paths given, Selenium never tries to download a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,820", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def _wait(driver, what: str, cond, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(cond, message=f"timed out waiting for {what}")


def _open(driver, url: str, model: str) -> None:
    """A fresh page: nothing in localStorage, the model id read from /v1/models."""
    driver.get(url)
    driver.execute_script("localStorage.clear()")
    driver.get(url)
    _wait(driver, f"model id {model!r}", lambda d: d.find_element("id", "model").text == model)


def _js(driver, code: str):
    return driver.execute_script(code)


def _assistant_texts(driver) -> list[str]:
    return _js(driver, "return [...document.querySelectorAll('.message.assistant .content')].map(e => e.textContent)")


def _stats(driver) -> list[str]:
    return _js(driver, "return [...document.querySelectorAll('.message.assistant .stats')].map(e => e.textContent)")


def _errors(driver) -> list[str]:
    return _js(driver, "return [...document.querySelectorAll('.error')].map(e => e.textContent)")


def _attach(driver, path: Path, chips: int = 1) -> None:
    driver.find_element("id", "file").send_keys(str(path))
    _wait(driver, f"{chips} attachment(s)", lambda d: len(_chips(d)) == chips)


def _chips(driver) -> list:
    return driver.find_elements("css selector", "#attachments .chip")


def _ask(driver, text: str) -> None:
    prompt = driver.find_element("id", "prompt")
    prompt.send_keys(text)
    driver.find_element("id", "send").click()


# the answers' texts and stats lines read in one go, so a text is never newer than its stats line
SNAPSHOT = """const q = (s) => [...document.querySelectorAll(s)].map(e => e.textContent);
              return [q('.message.assistant .content'), q('.message.assistant .stats')]"""


def _answer(driver, n: int) -> tuple[str, str, set[str]]:
    """Wait for the n-th answer's stats line; return its text, stats and every text seen meanwhile."""
    seen: set[str] = set()
    old_errors = len(_errors(driver))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        texts, stats = _js(driver, SNAPSHOT)
        if len(texts) >= n:
            seen.add(texts[n - 1])
        if len(stats) >= n and stats[n - 1]:
            return texts[n - 1], stats[n - 1], seen
        assert len(errors := _errors(driver)) == old_errors, f"the page shows an error: {errors[-1]}"
        time.sleep(0.02)
    raise AssertionError(f"no stats line for answer {n} after {WAIT_S} s; answers so far: {_assistant_texts(driver)}")


# ---- the stand-in server -----------------------------------------------------------------------

class _Fake:
    """What the stand-in saw and how it behaves; one per module, reset for each test."""

    model = "fake-smolvlm"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict] = []
        self.aborted = threading.Event()
        self.key: str | None = None  # when set, requests need `Authorization: Bearer <key>`


def _image_error(url: str) -> str | None:
    from PIL import Image

    m = re.match(r"data:([^;,]+);base64,(.*)$", url, re.S)
    if not m or not m.group(1).startswith("image/"):
        return "image_url must be a data:image/...;base64 URI"
    try:
        Image.open(io.BytesIO(base64.b64decode(m.group(2)))).verify()
    except Exception:  # noqa: BLE001 - any decode failure is the client's bad file
        return "the attached image could not be decoded"
    return None


class _Handler(BaseHTTPRequestHandler):
    fake: _Fake

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        self._json(status, {"error": error})

    def _authorized(self) -> bool:
        if self.fake.key and self.headers.get("Authorization") != f"Bearer {self.fake.key}":
            self._error(401, "invalid API key", "invalid_api_key")
            return False
        return True

    def do_GET(self) -> None:
        if self.path == "/":
            data = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            if self._authorized():
                self._json(200, {"object": "list", "data": [{"id": self.fake.model, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.fake.requests.append({"headers": dict(self.headers), "body": body})
        if not self._authorized():
            return
        last = body["messages"][-1]["content"]
        parts = last if isinstance(last, list) else [{"type": "text", "text": last}]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        videos = [p["video_url"]["url"] for p in parts if p["type"] == "video_url"]
        for url in images:
            if err := _image_error(url):
                return self._error(400, err, "invalid_image")
        question = " ".join(p["text"] for p in parts if p["type"] == "text")
        if question == "long":  # a slow answer for the stop button: 20 s if nobody stops it
            words, delay = [f" w{i}" for i in range(400)], 0.05
        else:
            seen = f"{len(images)} image{'s' * (len(images) != 1)}" + (f" and {len(videos)} video" if videos else "")
            answer = f"I see {seen}. You said: {question}"
            words, delay = re.findall(r"\S+\s*", answer), 0.08
        self._stream(words, delay, body.get("stream_options", {}).get("include_usage", False))

    def _stream(self, words: list[str], delay: float, usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(choices: list, **extra) -> None:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": self.fake.model,
                     "choices": choices, **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for w in words:
                time.sleep(delay)
                event([{"index": 0, "delta": {"content": w}, "finish_reason": None}])
            event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            if usage:
                n = 2 * len(words)  # two tokens a word, so the page's count visibly comes from here
                event([], usage={"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.fake.aborted.set()


@pytest.fixture(scope="module")
def fake_server():
    fake = _Fake()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def fake(fake_server, browser):
    fake, url = fake_server
    fake.reset()
    _open(browser, url, fake.model)
    return fake


# ---- tests against the stand-in ----------------------------------------------------------------

def test_page_is_self_contained():
    """No build step and no CDN: the page names no other host and loads no other file."""
    html = PAGE.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", html), "the page loads another file"
    assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", html, re.I), "the page names another host"


def test_chat_streams_an_answer_with_stats(browser, fake, tmp_path):
    # the API key is stored in the browser and sent as a Bearer token
    browser.find_element("id", "settings-toggle").click()
    key = browser.find_element("id", "api-key")
    key.send_keys("sekret")
    browser.find_element("id", "prompt").click()  # leaving the field saves it
    assert _js(browser, "return localStorage.getItem('smolvlm.apiKey')") == "sekret"

    _attach(browser, SHAPES)
    _ask(browser, "What colour is the triangle?")
    text, stats, seen = _answer(browser, 1)
    assert text == "I see 1 image. You said: What colour is the triangle?"
    assert STATS_RE.match(stats), stats
    assert stats.endswith("· 22 tokens"), stats  # from the usage chunk, not the 11 chunks
    assert any(t and t != text for t in seen), f"the answer did not stream: only saw {seen}"

    req = fake.requests[-1]
    assert req["headers"]["Authorization"] == "Bearer sekret"
    body = req["body"]
    assert body["stream"] is True and body["model"] == fake.model
    (msg,) = body["messages"]
    image, question = msg["content"]
    assert question == {"type": "text", "text": "What colour is the triangle?"}
    prefix = "data:image/png;base64,"
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix):]) == SHAPES.read_bytes()
    assert not _chips(browser), "the attachment was not cleared"

    # a second turn sends the whole conversation, the image still in its turn
    _ask(browser, "And the square?")
    text2, _, _ = _answer(browser, 2)
    assert text2 == "I see 0 images. You said: And the square?"
    messages = fake.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == msg and messages[1] == {"role": "assistant", "content": text}
    assert messages[2]["content"] == "And the square?"
    assert len(browser.find_elements("css selector", ".message.user .media img")) == 1

    # a video goes as a video_url part
    clip = encode_format(tmp_path, "mp4-mpeg4", num_frames=4)
    _attach(browser, clip)
    _ask(browser, "What happens?")
    text3, _, _ = _answer(browser, 3)
    assert text3 == "I see 0 images and 1 video. You said: What happens?"
    video = fake.requests[-1]["body"]["messages"][-1]["content"][0]
    assert video["type"] == "video_url" and video["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_paste_and_drop_attach(browser, fake):
    """A pasted image and a file dropped anywhere on the page both become attachments."""
    png = base64.b64encode(SHAPES.read_bytes()).decode()
    _js(browser, f"""
        const bytes = Uint8Array.from(atob("{png}"), c => c.charCodeAt(0));
        const file = (name) => new File([bytes], name, {{type: "image/png"}});
        const dt = (name) => {{ const d = new DataTransfer(); d.items.add(file(name)); return d; }};
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {{clipboardData: dt("pasted.png"), bubbles: true}}));
        document.getElementById("messages").dispatchEvent(
            new DragEvent("drop", {{dataTransfer: dt("dropped.png"), bubbles: true, cancelable: true}}));
    """)
    _wait(browser, "two attachments", lambda d: len(_chips(d)) == 2)
    names = [e.text for e in browser.find_elements("css selector", "#attachments .chip .name")]
    assert sorted(names) == ["dropped.png", "pasted.png"]
    browser.find_element("css selector", "#attachments .chip .remove").click()
    assert len(_chips(browser)) == 1


def test_bad_file_shows_the_server_error(browser, fake, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is text, not a PNG\n")
    _attach(browser, bad)
    _wait(browser, "the no-preview placeholder", lambda d: d.find_elements("css selector", "#attachments .placeholder"))
    _ask(browser, "What is this?")
    _wait(browser, "an error", lambda d: _errors(d))
    (err,) = _errors(browser)
    assert err.startswith("Error 400") and "could not be decoded" in err, err
    assert not browser.find_elements("css selector", ".message.assistant"), "an empty answer was left behind"
    assert browser.find_elements("css selector", ".message.user.failed")
    assert browser.find_element("id", "prompt").get_attribute("value") == "What is this?"  # ready to retry

    # the failed turn is not part of the conversation any more
    browser.find_element("id", "send").click()
    _answer(browser, 1)
    assert [m["role"] for m in fake.requests[-1]["body"]["messages"]] == ["user"]

    # a file that is neither an image nor a video is refused in the page, before any request
    n = len(fake.requests)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    browser.find_element("id", "file").send_keys(str(notes))
    _wait(browser, "a second error", lambda d: len(_errors(d)) == 2)
    assert _errors(browser)[1] == "notes.txt is not an image or a video."
    assert len(fake.requests) == n and not _chips(browser)


def test_stop_aborts_a_long_answer(browser, fake):
    _ask(browser, "long")
    _wait(browser, "the answer to start", lambda d: (t := _assistant_texts(d)) and len(t[0]) > 10)
    stop = browser.find_element("id", "stop")
    assert stop.is_displayed() and not browser.find_element("id", "send").is_displayed()
    stop.click()
    _wait(browser, "the stopped stats", lambda d: (s := _stats(d)) and s[0].startswith("stopped · "))
    assert fake.aborted.wait(WAIT_S), "the server never saw the request go away"
    text = _assistant_texts(browser)[0]
    time.sleep(0.3)
    assert _assistant_texts(browser)[0] == text, "text kept arriving after Stop"
    assert 0 < len(text) < 400 * 3
    assert not _errors(browser), _errors(browser)
    assert browser.find_element("id", "send").is_displayed() and not stop.is_displayed()


def test_missing_api_key_is_shown(browser, fake_server):
    fake, url = fake_server
    fake.reset()
    fake.key = "k"
    browser.get(url)
    browser.execute_script("localStorage.clear()")
    browser.get(url)
    _wait(browser, "an error", lambda d: _errors(d))
    assert browser.find_element("id", "model").text == "not connected"
    assert _errors(browser)[0] == "Error 401 Unauthorized: invalid API key\nSet the server's API key in Settings."


# ---- the real server ---------------------------------------------------------------------------

KEY = "web-page-test-key"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, ref256):
    """`smolvlm serve` on a tiny random checkpoint, on a free loopback port; always stopped."""
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("web") / "ckpt", ref256)
    env = {**os.environ, "SMOLVLM_API_KEY": KEY}  # the key reaches the server as CI would pass it
    with serve_command(["--model", str(ckpt)], tmp_path_factory.mktemp("web") / "serve.log", env=env,
                       timeout_s=120) as url:
        yield str(ckpt), url + "/"


def test_page_against_the_real_server(browser, real_server, tmp_path):
    model, url = real_server
    browser.get(url)
    browser.execute_script("localStorage.clear()")
    browser.get(url)
    # without the key the page says what is wrong
    _wait(browser, "the 401 error", lambda d: _errors(d))
    assert _errors(browser)[0].startswith("Error 401") and "API key in Settings" in _errors(browser)[0]
    assert browser.find_element("id", "model").text == "not connected"

    browser.find_element("id", "settings-toggle").click()
    browser.find_element("id", "api-key").send_keys(KEY)
    max_tokens = browser.find_element("id", "max-tokens")
    max_tokens.send_keys("8")
    browser.find_element("id", "prompt").click()
    _wait(browser, f"model id {model!r}", lambda d: d.find_element("id", "model").text == model)

    # an image and a question: a streamed answer (random tokens from a tiny model) and its stats
    _attach(browser, SHAPES)
    _ask(browser, "What colour is the triangle?")
    text, stats, _ = _answer(browser, 1)
    assert text.strip(), "the answer is empty"
    assert re.match(r"^\d+\.\d\d s to first token · (\d+\.\d tokens/s · )?\d+ tokens?", stats), stats

    # a file that is not an image: the server's 400 is shown in the page
    bad = tmp_path / "bad.png"
    bad.write_text("this is text, not a PNG\n")
    _attach(browser, bad)
    browser.find_element("id", "prompt").clear()
    _ask(browser, "What is this?")
    _wait(browser, "the 400 error", lambda d: len(_errors(d)) == 2)
    err = _errors(browser)[1]
    assert err.startswith("Error 400") and "image" in err, err
    assert len(_assistant_texts(browser)) == 1

    # a long answer (the rest of the context, about 900 tokens), stopped after its first words
    max_tokens.clear()
    browser.find_element("id", "prompt").clear()
    _ask(browser, "Tell me more.")
    _wait(browser, "the answer to start", lambda d: len(_assistant_texts(d)) == 2 and _assistant_texts(d)[1])
    browser.find_element("id", "stop").click()
    _wait(browser, "the stopped stats", lambda d: len(s := _stats(d)) == 2 and s[1].startswith("stopped · "))
    assert len(_errors(browser)) == 2, _errors(browser)
