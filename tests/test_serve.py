"""serve.py on tiny toy checkpoints (a fine-tuned one beside a text-only one): a real browser
asks it about an uploaded picture and gets sample.py's greedy answers, streamed; bad requests
get their message and leave the server running; a load of concurrent and malformed requests is
answered with memory flat."""

import base64
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import inference
import sample
from tests.test_sample import toy  # noqa: F401 (the fixture: a toy world and its tiny checkpoints)
from tests.tiny_data import ROOT

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def server(toy):  # noqa: F811
    """serve.py on a free loopback port: column 0 the fine-tuned checkpoint, column 1 the
    text-only one. Two malloc arenas: by default glibc gives new threads (one per request) up
    to 8 arenas per core, whose fragmentation grows the server's memory by a few MiB over
    hundreds of requests and would hide a leak of that size (README, "Ask in the browser")."""
    process = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={toy['sft']}", f"--ckpt_b={toy['text_only']}",
                                f"--data_dir={toy['data']}", "--port=0", f"--max_new_tokens={MAX_NEW_TOKENS}",
                                "--max_upload_mb=0.5"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2"))
    for line in process.stdout:  # the config: lines, then the address
        address = re.search(r"serving 2 checkpoint\(s\) at http://127\.0\.0\.1:(\d+)/", line)
        if address:
            break
    assert address, "serve.py did not start"
    yield {"port": int(address[1]), "process": process}
    process.terminate()
    process.wait(timeout=60)


def post(port, body, raw=False):
    """POST /ask: (status, the answer's events or the error's JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/ask", body if raw else json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    if response.getheader("Content-Type") != "text/event-stream":
        return response.status, json.loads(text)
    events = []
    for block in text.split("\n\n")[:-1]:
        kind, data = block.split("\n")
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return response.status, events


def answer_of(events):
    """The text and token ids of a streamed answer that ended well."""
    assert events[-1][0] == "done", f"the answer did not end well: {events}"
    return "".join(data["text"] for kind, data in events if kind == "text"), events[-1][1]["answer_ids"]


def rss_kib(process):
    with open(f"/proc/{process.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1])


def png_of_scene(toy, n, path):  # noqa: F811
    Image.fromarray(np.load(os.path.join(toy["data"], "eval_images.npy"))[n]).save(path)  # PNG: lossless
    return path


def png_bytes(toy, n):  # noqa: F811
    buffer = io.BytesIO()
    Image.fromarray(np.load(os.path.join(toy["data"], "eval_images.npy"))[n]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium; skipped where it is not installed, except in CI."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are missing (.ci/run installs them)")
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("no selenium here (pip install -r requirements-test.txt)")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield driver
    driver.quit()


def test_browser_upload_question_and_streamed_answer_equal_sample(toy, server, browser, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = png_of_scene(toy, 7, tmp_path / "scene.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    questions = ["what color is the circle?", "how many shapes are there?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n"))
    expected = sample.main([f"--ckpt={toy['sft']}", f"--image={picture}", f"--max_new_tokens={MAX_NEW_TOKENS}"])
    tokenizer = inference.load_model(toy["sft"], "cpu")[1]
    assert len(expected) == 2 and expected[0]  # the tiny model says something

    browser.get(f"http://127.0.0.1:{server['port']}/")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    columns = browser.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.find_element(By.TAG_NAME, "h2").text for c in columns] == [toy["sft"], toy["text_only"]]

    def ask(question):
        """Asks through the page; each column's latest answer: (state, text, tokens streamed)."""
        n_asked = len(browser.find_elements(By.CSS_SELECTOR, ".answer"))
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "ask").click()
        WebDriverWait(browser, 120).until(
            lambda b: (len(b.find_elements(By.CSS_SELECTOR, ".answer")) == n_asked + 2
                       and not b.find_elements(By.CSS_SELECTOR, "[data-state=streaming]")))
        return [(a.get_attribute("data-state"), a.text, int(a.get_attribute("data-tokens")))
                for a in (c.find_elements(By.CSS_SELECTOR, ".answer")[-1] for c in columns)]

    # a file that is no picture: a message in each column, and the server carries on
    browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "broken.png"))
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "caption").text == "broken.png")
    (state, text, _), (state_b, text_b, _) = ask(questions[0])
    assert state == "error" and text == "broken.png is not a picture (Pillow cannot read it)"
    assert state_b == "error" and "is a text-only checkpoint" in text_b and "cannot be shown a picture" in text_b

    # the picture: a conversation of two turns, each answer sample.py's, streamed token by token
    browser.find_element(By.ID, "upload").send_keys(str(picture))
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "caption").text == "scene.png")
    for question, answer in zip(questions, expected):
        (state, text, n_streamed), (state_b, text_b, _) = ask(question)
        # the page's .text may keep an answer's leading space (Chromium's rendering decides): compare stripped
        assert state == "done" and text.strip() == tokenizer.decode(answer).strip()
        assert n_streamed == len(answer)  # one event per token: streamed, not sent at the end
        assert state_b == "error" and "is a text-only checkpoint" in text_b
    assert browser.find_element(By.ID, "picture").get_attribute("naturalWidth") == "32"  # the picture shows
    assert server["process"].poll() is None


BAD_REQUESTS = [  # (the case, the request's JSON fields, what its message says)
    ("not a picture", {"image": base64.b64encode(b"not a png").decode(), "image_name": "notes.txt", "question": "hi"},
     r"^notes.txt is not a picture \(Pillow cannot read it\)$"),
    ("a picture over max_upload_mb",
     {"image": base64.b64encode(bytes(600_000)).decode(), "image_name": "big.png", "question": "hi"},
     r"^big.png is larger than 0.5 MB \(the server's max_upload_mb\)$"),
    ("a picture for a text-only checkpoint", {"column": 1, "toy_scene": 0, "question": "hi"},
     r"ckpt_frac0.50.pt is a text-only checkpoint .* cannot be shown a picture"),
    ("a toy scene and a picture", {"toy_scene": 1, "image": "{png}", "question": "hi"}, r"either image or toy_scene"),
    ("a toy scene out of range", {"toy_scene": 99999, "question": "hi"}, r"toy_scene must lie in 0\.\.71 "),
    ("a word outside the compact vocabulary", {"question": "What is THIS?"},
     r"not in this dataset's compact vocabulary"),
    ("a question longer than the context", {"question": " ".join(["red"] * 200)},
     r"longer than the model's context of 128 tokens"),
    ("nothing to answer", {"toy_scene": 2}, r"nothing to answer: ask a question"),
    ("no room to answer", {"question": "hi", "max_new_tokens": 0}, r"max_new_tokens must be at least 1"),
    ("a column that is not there", {"column": 2, "question": "hi"}, r"column must lie in 0\.\.1, got 2"),
    ("an unknown field", {"questoin": "hi"}, r"unknown fields \['questoin'\]"),
    ("a wrong type", {"toy_scene": "3", "question": "hi"}, r"toy_scene must be a whole number, got '3'"),
    ("a broken conversation", {"question": "hi", "history": [["hi", [10**9]]]}, r"history must hold"),
    ("a temperature that is no number", {"question": "hi", "temperature": float("nan")}, r"temperature and top_k not"),
    ("a seed torch cannot take", {"question": "hi", "seed": -1}, r"seed must lie in 0\.\.2\*\*63-1, got -1"),
    ("base64 that is not", {"image": "***", "question": "hi"}, r"image must be the picture file's bytes in base64"),
]


def test_bad_requests_get_their_message_and_the_server_carries_on(toy, server):  # noqa: F811
    png = base64.b64encode(png_bytes(toy, 1)).decode()
    for case, request, message in BAD_REQUESTS:
        request = {k: png if v == "{png}" else v for k, v in request.items()}
        status, body = post(server["port"], request)
        assert status == 400 and re.search(message, body["error"]), f"{case}: {status} {body}"
    status, body = post(server["port"], b"{not json", raw=True)
    assert status == 400 and body["error"].startswith("the question is not valid JSON")
    status, body = post(server["port"], b"x" * (3 * 2**20), raw=True)  # read and dropped, then refused
    assert status == 400 and "3,145,728 bytes, more than one with a picture of 0.5 MB" in body["error"]
    # the same checkpoint and questions still answer, as sample.py does
    status, events = post(server["port"], {"toy_scene": 4, "question": "how many shapes are there?"})
    text, ids = answer_of(events)
    assert ids == sample.main([f"--ckpt={toy['sft']}", f"--data_dir={toy['data']}", "--toy_scene=4",
                               "--prompt=how many shapes are there?", f"--max_new_tokens={MAX_NEW_TOKENS}"])[0]


def test_load_of_concurrent_and_malformed_requests(toy, server):  # noqa: F811
    """20 good questions at once over both columns, with 5 malformed requests among them, five
    times: every good one gets the answer it gets alone, the server lives on and its memory
    stays flat."""
    port, png = server["port"], base64.b64encode(png_bytes(toy, 5)).decode()
    kinds = [{"column": 0, "toy_scene": 3, "question": "what color is the square?"},
             {"column": 0, "image": png, "image_name": "scene.png", "question": "is there a red circle?"},
             {"column": 1, "question": "three plus four is"}]  # the text-only checkpoint, text only
    alone = [answer_of(post(port, kind)[1]) for kind in kinds]  # also warms the server up

    def truncated_body():  # says 1000 bytes, sends 10 and hangs up
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.putrequest("POST", "/ask")
        connection.putheader("Content-Length", "1000")
        connection.endheaders(b'{"question"')
        connection.close()

    malformed = [lambda: post(port, b"\xff\xfe", raw=True), lambda: post(port, [1, 2], raw=False),
                 lambda: post(port, {"image": base64.b64encode(b"GIF89a broken").decode(), "question": "hi"}),
                 lambda: post(port, b"x" * (3 * 2**20), raw=True), truncated_body]

    def load_round():
        results, refusals = [None] * 20, [None] * len(malformed)

        def good(i):
            results[i] = post(port, kinds[i % len(kinds)])

        def bad(i):
            refusals[i] = malformed[i]()

        threads = [threading.Thread(target=good, args=(i,)) for i in range(20)]
        threads += [threading.Thread(target=bad, args=(i,)) for i in range(len(malformed))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not any(thread.is_alive() for thread in threads)
        for i, (status, events) in enumerate(results):
            assert status == 200 and answer_of(events) == alone[i % len(kinds)], f"request {i}"
        assert [status for status, _ in refusals[:-1]] == [400] * (len(malformed) - 1)  # the last hung up

    for _ in range(2):  # the first rounds still grow the heap
        load_round()
    after_first = rss_kib(server["process"])
    for _ in range(3):
        load_round()
    after_more = rss_kib(server["process"])
    assert server["process"].poll() is None
    status, body = post(port, {"question": "What"})  # still answering, a bad question too
    assert status == 400 and "compact vocabulary" in body["error"]
    # Flat: three more rounds grow the server by less than 4 MiB, where keeping each round's
    # 3 MiB request body alone would add 9 MiB.
    assert after_more - after_first < 4 * 1024, f"RSS {after_first} KiB -> {after_more} KiB"
