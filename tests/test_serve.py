"""`python -m pipeline.serve` on a tiny stage-2 run, on loopback, driven by the official `openai` client: streamed and
whole answers equal `pipeline.chat`'s; 16 concurrent clients are batched together and get the answers they get one
at a time; every kind of bad request gets its 4xx and OpenAI's error body while a good request in flight still
succeeds; the chat page, in headless Chromium, takes an uploaded image, streams the answer and continues the chat.
An export of another family (SigLIP + Qwen3) answers like `pipeline.chat` through the server's app in process."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import open_headless_chromium
from hf_runs import QUESTIONS, chat_answers, siglip_qwen3_models, toy_images, write_stage2_run

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 6
SERVER_MAX_NEW_TOKENS = 16
MAX_IMAGE_BYTES = 100_000
CLIENTS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = write_stage2_run(tiny_models / "clip", tiny_models / "llm", root / "stage2")
    images = toy_images(root / "images", CLIENTS)
    port = free_port()
    log = (root / "server.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipeline.serve", str(run), "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--model-name",
        "toy-chat",
        "--max-new-tokens",
        str(SERVER_MAX_NEW_TOKENS),
        "--max-image-bytes",
        str(MAX_IMAGE_BYTES),
    ]
    command += ["--batch-window-ms", "50", "--allow-local-images", str(root / "images")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            get_json(f"{base}/health")
            break
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield {"base": base, "run": run, "images": images, "root": root, "process": process}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user_turn(image_url: str, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}],
    }


def ask(server, image: Path, question: str, stream: bool = False) -> str:
    messages = [user_turn(data_url(image), question)]
    options = dict(model="toy-chat", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    if not stream:
        completion = client(server).chat.completions.create(**options)
        assert completion.choices[0].finish_reason in ("stop", "length")
        return completion.choices[0].message.content
    chunks = list(client(server).chat.completions.create(**options, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def chat_cli(run: Path, image: Path, questions: list[str], capsys, monkeypatch, max_tokens: int = MAX_TOKENS) -> list:
    from pipeline import chat

    args = [str(run), "--image", str(image), "--max-new-tokens", str(max_tokens), "--device", "cpu"]
    capsys.readouterr()
    typed = iter([*questions, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert chat.main(args) == 0
    return capsys.readouterr().out.strip().splitlines()


def question_for(index: int) -> str:
    return QUESTIONS[index % len(QUESTIONS)]


def test_streamed_and_whole_answers_equal_pipeline_chat(server, capsys, monkeypatch):
    for index in range(2):
        image, question = server["images"][index], question_for(index)
        (expected,) = chat_cli(server["run"], image, [question], capsys, monkeypatch)
        assert expected
        assert ask(server, image, question) == expected
        assert ask(server, image, question, stream=True) == expected
    # A second turn, and the image named as a local file under the directory the operator allowed.
    image = server["images"][0]
    first, second = chat_cli(server["run"], image, [question_for(0), "what shape is it ?"], capsys, monkeypatch)
    messages = [
        user_turn(str(image), question_for(0)),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "what shape is it ?"},
    ]
    completion = client(server).chat.completions.create(
        model="toy-chat", messages=messages, temperature=0, max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].message.content == second
    assert completion.usage.completion_tokens <= MAX_TOKENS and completion.usage.prompt_tokens > 4


def test_concurrent_clients_are_batched_and_answered_as_one_at_a_time(server):
    pairs = [(server["images"][index], question_for(index)) for index in range(CLIENTS)]
    sequential = [ask(server, image, question) for image, question in pairs]
    before = get_json(f"{server['base']}/health")
    answers: list = [None] * CLIENTS
    start = threading.Barrier(CLIENTS)

    def one(index: int) -> None:
        start.wait()
        try:
            answers[index] = ask(server, *pairs[index], stream=index % 2 == 1)
        except Exception as error:  # recorded, so the assertion below shows it
            answers[index] = error

    threads = [threading.Thread(target=one, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = get_json(f"{server['base']}/health")
    assert answers == sequential
    assert len(set(sequential)) > 1
    # Batched, not served one by one: far fewer generate calls than requests, some holding several requests.
    assert after["requests"] - before["requests"] == CLIENTS
    assert after["batches"] - before["batches"] < CLIENTS // 2
    assert after["largest_batch"] > 1


def post(server, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server['base']}/v1/chat/completions", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def noise_png(side: int) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_requests_get_their_4xx_while_a_good_request_succeeds(server):
    image = server["images"][3]
    good = {}

    def good_request():
        good["answer"] = ask(server, image, question_for(3), stream=True)

    expected = ask(server, image, question_for(3))
    worker = threading.Thread(target=good_request)
    worker.start()
    valid = [user_turn(data_url(image), "what colour is the shape ?")]
    oversized = noise_png(256)
    assert len(oversized) > MAX_IMAGE_BYTES
    text_file = "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode()
    long_question = " ".join(["what colour is the shape ?"] * 60)
    cases = {
        "malformed json": (b'{"model": "toy-chat", "messages": [', 400, "invalid_json"),
        "not json at all": (b"hello", 400, "invalid_json"),
        "no messages": ({"model": "toy-chat"}, 400, "invalid_value"),
        "unknown model": ({"model": "gpt-4o", "messages": valid}, 404, "model_not_found"),
        "non-image data": ({"model": "toy-chat", "messages": [user_turn(text_file, "what ?")]}, 400, "invalid_image"),
        "bad base64": ({"model": "toy-chat", "messages": [user_turn("data:image/png;base64,@@@", "?")]}, 400, None),
        "oversized image": (
            {
                "model": "toy-chat",
                "messages": [user_turn("data:image/png;base64," + base64.b64encode(oversized).decode(), "?")],
            },
            413,
            "image_too_large",
        ),
        "remote url": ({"model": "toy-chat", "messages": [user_turn("http://127.0.0.1:1/x.png", "?")]}, 400, None),
        "file outside the allowed directory": (
            {"model": "toy-chat", "messages": [user_turn(str(ROOT / "README.md"), "?")]},
            400,
            "image_not_allowed",
        ),
        "two images": (
            {"model": "toy-chat", "messages": [user_turn(data_url(image), "a"), user_turn(data_url(image), "b")]},
            400,
            "too_many_images",
        ),
        "prompt longer than the context": (
            {"model": "toy-chat", "messages": [user_turn(data_url(image), long_question)]},
            400,
            "context_length_exceeded",
        ),
        "max_tokens over the limit": (
            {"model": "toy-chat", "messages": valid, "max_tokens": 10_000},
            400,
            "max_tokens_too_large",
        ),
        "negative temperature": ({"model": "toy-chat", "messages": valid, "temperature": -1}, 400, "invalid_value"),
        "unknown role": ({"model": "toy-chat", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_role"),
    }
    for name, (body, status, code) in cases.items():
        got_status, error = post(server, body)
        assert got_status == status, (name, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, name
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"], name
        if code is not None:
            assert error["error"]["code"] == code, (name, error)
    import openai

    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=valid)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="toy-chat", messages=valid, max_tokens=10_000)
    worker.join(timeout=120)
    assert good.get("answer") == expected
    assert get_json(f"{server['base']}/health")["status"] == "ok"
    assert [model.id for model in client(server).models.list().data] == ["toy-chat"]


def test_chat_page_streams_an_answer_in_headless_chromium(server, tmp_path, capsys, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = server["images"][4]
    questions = ["what colour is the shape ?", "what shape is it ?"]  # typed: a newline would send the form
    # The page asks for no max_tokens, so the server's default (--max-new-tokens 16) applies.
    expected = chat_cli(server["run"], image, questions, capsys, monkeypatch, max_tokens=SERVER_MAX_NEW_TOKENS)
    driver = open_headless_chromium(tmp_path / "profile", window="900,900")
    try:
        driver.get(server["base"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "toy-chat" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "image-input").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/"))
        for turn, question in enumerate(questions, 1):
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d, turn=turn: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant.done")) == turn)
        answers = [element.text for element in driver.find_elements(By.CSS_SELECTOR, ".message.assistant")]
        driver.save_screenshot(str(tmp_path / "chat_page.png"))
    finally:
        driver.quit()
    assert not driver_errors(answers)
    assert (tmp_path / "chat_page.png").stat().st_size > 1000
    # The page's answers are the server's streamed ones, which equal the chat CLI's, turn by turn.
    assert answers == expected


def driver_errors(answers: list[str]) -> list[str]:
    return [answer for answer in answers if not answer]


def sse_text(body: str) -> str:
    """The content of a streamed completion's chunks."""
    chunks = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: {")]
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


def test_a_siglip_qwen3_export_answers_like_pipeline_chat(tmp_path):
    """The server's own loader, engine and app (no socket) on the export of a SigLIP + Qwen3 run, whose prompts have
    no BOS and Qwen3's non-thinking chat format: a whole answer and a streamed second turn equal `pipeline.chat`'s."""
    from fastapi.testclient import TestClient

    from pipeline.export_hf import export
    from pipeline.serve.api import ServerLimits, create_app
    from pipeline.serve.engine import Engine, load

    vision, llm = siglip_qwen3_models(tmp_path / "models")
    run = write_stage2_run(vision, llm, tmp_path / "stage2")
    image = toy_images(tmp_path / "images", 1)[0]
    follow_up = "what shape is it ?"
    expected = chat_answers(run, image, [QUESTIONS[0], follow_up], MAX_TOKENS)
    model, processor = load(str(export(run, tmp_path / "hf")), "cpu", "float32")
    engine = Engine(model, processor, max_batch_size=4, batch_window_s=0.01)
    engine.start()
    try:
        with TestClient(create_app(engine, "qwen-chat", ServerLimits(max_new_tokens=SERVER_MAX_NEW_TOKENS))) as http:
            options = {"model": "qwen-chat", "temperature": 0, "max_tokens": MAX_TOKENS}
            messages = [user_turn(data_url(image), QUESTIONS[0])]
            first = http.post("/v1/chat/completions", json=options | {"messages": messages})
            assert first.status_code == 200, first.text
            answer = first.json()["choices"][0]["message"]["content"]
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
            second = http.post("/v1/chat/completions", json=options | {"messages": messages, "stream": True})
            assert second.status_code == 200, second.text
    finally:
        engine.stop()
    assert [answer, sse_text(second.text)] == expected
    assert all(expected)
