"""`tightrope predict` and `tightrope serve`: torch-free, in order, and every bad request refused with a 4xx sentence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers")
# runs the real command line and, at exit, writes the names of every imported module to $MODULES_OUT
WITH_MODULE_LIST = ("import atexit, json, os, sys\n"
                    "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
                    "from tightrope.cli import app\napp()\n")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tokenizer) -> Path:
    from tightrope.compress.export import export_bundle
    from tightrope.models import save_model

    root = tmp_path_factory.mktemp("bundle")
    card = {"tokenization": {"max_length": 64, "truncation": "head+tail"}}
    src = save_model((make_tiny_classifier(tokenizer, seed=1), tokenizer), root / "tiny", extra={"card.json": card})
    export_bundle(str(src), root / "b")
    return root / "b"


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from tightrope.serving import Bundle

    return Bundle(bundle_dir, threads=1)


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "MODULES_OUT": str(tmp_path / "modules.json"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _heavy_modules(tmp_path) -> list[str]:
    modules = json.loads((tmp_path / "modules.json").read_text())
    return [m for m in modules if m.split(".")[0] in HEAVY]


def test_predict_reads_jsonl_writes_labels_in_order_and_imports_no_torch(tmp_path, bundle_dir, bundle):
    texts = POSITIVE + NEGATIVE + ["word " * 300]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    done = subprocess.run([sys.executable, "-c", WITH_MODULE_LIST, "predict", str(bundle_dir), "--input", str(source),
                           "--batch-size", "4", "--threads", "1"], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _heavy_modules(tmp_path) == []
    assert "onnxruntime" in json.loads((tmp_path / "modules.json").read_text())
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in rows] == list(range(len(texts)))
    expected = bundle.predict(texts, batch_size=4)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    for row in rows:
        assert set(row["probabilities"]) == set(bundle.label_names)
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-6


def test_predict_reads_csv_and_stdin(tmp_path, bundle_dir, bundle):
    from tightrope.serving.predict import predict_file

    csv_file = tmp_path / "in.csv"
    csv_file.write_text('text,stars\n"great, really great",5\nawful,1\n')
    out = tmp_path / "out.jsonl"
    assert predict_file(bundle_dir, str(csv_file), str(out), threads=1) == 2
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels == [p["label"] for p in bundle.predict(["great, really great", "awful"])]
    done = subprocess.run([sys.executable, "-c", WITH_MODULE_LIST, "predict", str(bundle_dir), "--format", "text"],
                          input="great film\nawful film\n", capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2 and _heavy_modules(tmp_path) == []


@pytest.mark.parametrize(("content", "args", "message"), [
    ('{"text": "fine"}\n{"txt": "x"}\n', (), "Line 2 of the input is neither"),
    ('{"text": "fine"}\nnot json\n', (), "Line 2 of the input is not valid JSON"),
    ('{"text": ""}\n', (), "Line 1 of the input has an empty text"),
    ("a,b\n1,2\n", ("--format", "csv"), "no 'text' column"),
])
def test_predict_bad_input_is_one_sentence_and_no_output_file(tmp_path, bundle_dir, content, args, message):
    from typer.testing import CliRunner

    from tightrope.cli import app

    source = tmp_path / "in.jsonl"
    source.write_text(content)
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), "--input", str(source), "--output",
                                      str(tmp_path / "out.jsonl"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(("target", "message"), [("missing", "does not exist"), ("model", "not a tightrope bundle")])
def test_predict_on_a_folder_that_is_not_a_bundle(tmp_path, tiny_model_dir, target, message):
    from typer.testing import CliRunner

    from tightrope.cli import app

    folder = tmp_path / "missing" if target == "missing" else tiny_model_dir
    result = CliRunner().invoke(app, ["predict", str(folder)], input='{"text": "x"}\n')
    assert result.exit_code == 2 and message in " ".join(result.output.split())


# --- the HTTP endpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(bundle):
    from starlette.testclient import TestClient

    from tightrope.serving.server import create_app

    with TestClient(create_app(bundle, max_batch=8, max_chars=20_000), raise_server_exceptions=False) as c:
        yield c


def test_serve_answers_one_text_and_a_batch(client, bundle):
    one = client.post("/predict", json={"text": POSITIVE[0]})
    assert one.status_code == 200
    assert one.json() == bundle.predict([POSITIVE[0]])[0] | {"probabilities": one.json()["probabilities"]}
    many = client.post("/predict", json={"texts": POSITIVE[:3] + NEGATIVE[:3]})
    assert many.status_code == 200
    assert [p["label"] for p in many.json()["predictions"]] == [p["label"] for p in bundle.predict(POSITIVE[:3] + NEGATIVE[:3])]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8


BAD_REQUESTS = [
    ("empty text", {"json": {"text": ""}}, 422, "is empty"),
    ("blank text", {"json": {"text": "   \n"}}, 422, "is empty"),
    ("1 MB text", {"json": {"text": "a" * 1_000_000}}, 413, "the limit is 20,000"),
    ("malformed JSON", {"content": b'{"text": "unterminated', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("not UTF-8", {"content": b'{"text": "\xff\xfe"}'}, 400, "not UTF-8"),
    ("wrong field", {"json": {"review": "great"}}, 422, "Unknown field 'review'"),
    ("no field", {"json": {}}, 422, "exactly one of"),
    ("both fields", {"json": {"text": "a", "texts": ["b"]}}, 422, "exactly one of"),
    ("not an object", {"json": ["great"]}, 422, "must be a JSON object"),
    ("text not a string", {"json": {"text": 5}}, 422, "is a int, not a string"),
    ("texts not a list", {"json": {"texts": "great"}}, 422, "must be a list"),
    ("empty batch", {"json": {"texts": []}}, 422, "is empty"),
    ("batch above the limit", {"json": {"texts": ["great"] * 9}}, 413, "the limit is 8"),
    ("empty text in a batch", {"json": {"texts": ["great", ""]}}, 422, "Text 1 is empty"),
    ("body far too large", {"content": b"x" * 2_000_000}, 413, "request body"),
]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_a_4xx_sentence_and_the_server_keeps_serving(client, name, request_kwargs, status, message):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and error.endswith(".") and error.count(". ") == 0 and "Traceback" not in error
    assert client.post("/predict", json={"text": "still serving"}).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [("get", "/predict", 405), ("post", "/nowhere", 404)])
def test_wrong_method_or_path_is_a_json_sentence(client, method, path, status):
    response = getattr(client, method)(path)
    assert response.status_code == status and response.json()["error"].endswith(".")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_listens_on_localhost_and_imports_no_torch(tmp_path, bundle_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", WITH_MODULE_LIST, "serve", str(bundle_dir), "--port", str(port),
                             "--threads", "1"], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read()[-2000:])
                time.sleep(0.1)
        request = urllib.request.Request(f"{url}/predict", data=json.dumps({"text": "great"}).encode(),
                                         headers={"content-type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert answer["label"] in ("LABEL_0", "LABEL_1")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert _heavy_modules(tmp_path) == []


def test_serve_on_a_folder_that_is_not_a_bundle_is_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from tightrope.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_only_the_serving_commands_load_for_predict_and_serve():
    from tightrope.cli import TORCH_FREE_COMMANDS, _invoked_command

    assert _invoked_command(["tightrope", "predict", "dir"]) == "predict"
    assert _invoked_command(["tightrope", "--help"]) is None
    assert set(TORCH_FREE_COMMANDS) == {"predict", "serve"}
    done = subprocess.run([sys.executable, "-c", "from tightrope.cli import app; app()", "--help"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
    assert all(c in done.stdout for c in ("export", "predict", "serve", "compress", "train"))
