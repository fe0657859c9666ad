"""``textok serve`` without a browser: the JSON API over a real socket, checked against the library's own output.

The browser test (test_serve_browser.py) drives the page; this file checks what the page is sent.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from serve_models import make_models

from textok.apps.serve import ServeApp, make_server
from textok.apps.serve.pictures import to_uint8
from textok.cli import build_parser
from textok.data.scenes import CaptionedScenes
from textok.errors import TextokError
from textok.models.registry import load_tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    paths = make_models(tmp_path_factory.mktemp("serve"))
    app = ServeApp([paths["text"], paths["notext"], paths["bad"]], paths["generator"])
    server = make_server(app, "127.0.0.1", 0)
    app.test_server = server  # the tests that shorten its deadlines reach it here
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, app, paths
    server.shutdown()
    server.server_close()


def request(url: str, data: bytes | dict | None = None, method: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    body = json.dumps(data).encode() if isinstance(data, dict) else data
    kind = {"Content-Type": "application/json"} if isinstance(data, dict) or (body or b"").startswith(b"{") else {}
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={**kind, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def by_name(results: list[dict]) -> dict[str, dict]:
    """Results by their directory's last folder (the page's names carry the parent folder too)."""
    return {Path(r["directory"]).name: r for r in results}


def test_the_verb_is_registered_with_its_options():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    serve = sub.choices["serve"]
    opts = {o for a in serve._actions for o in a.option_strings}
    assert {"--model", "--generator", "--port", "--host"} <= opts
    assert serve.parse_args([]).host == "127.0.0.1" and serve.parse_args([]).port == 7860


def test_static_files_fetch_nothing_from_elsewhere(served):
    url, _, _ = served
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert '<script src="/static/app.js">' in page
    for name in ("index.html", "app.js", "style.css"):
        text = resources.files("textok.apps.serve").joinpath("static", name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} refers to another host"
        assert urllib.request.urlopen(url + ("" if name == "index.html" else f"static/{name}"), timeout=30).status == 200


def test_info_lists_the_models_and_why_one_did_not_load(served):
    url, _, paths = served
    status, info = request(url + "api/info")
    assert status == 200
    models = by_name(info["models"])
    assert models["text"]["text"] == "text in encoder + decoder" and models["notext"]["text"] == "no text"
    assert models["text"]["tokens"] == {"count": 4, "bits": 4 * 4 * 32, "what": "4 tokens × 4 float32 values"}
    assert "config.json is corrupt" in models["broken"]["error"] and "\n" not in models["broken"]["error"]
    gen = info["generators"][0]
    assert gen["classes"][:2] == ["circle", "square"] and gen["kind"] == "dit"
    assert gen["tokenizer"] == models["notext"]["name"] and gen["tokenizer_loaded"]  # its samples go beside it
    assert info["legends"]["heat"][0] == "#000004" and info["legends"]["tokens"][2] == "#f7f7f7"


def test_reconstruction_is_the_librarys_and_follows_the_caption(served):
    url, _, paths = served
    scene = CaptionedScenes(image_size=16, split="test")[5]
    status, out = request(url + "api/reconstruct", {"scene": 5, "caption": "a red circle", "swap_caption": "a blue star"})
    assert status == 200
    got = by_name(out["results"])
    model = load_tokenizer(paths["text"]).eval()
    with torch.no_grad():
        z = model.encode(scene["image"][None], ["a red circle"])
        recon = model.decode(z, ["a red circle"]).clamp(-1, 1)
        swapped = model.decode(z, ["a blue star"]).clamp(-1, 1)
    assert np.abs(from_data_url(got["text"]["recon"]).astype(int) - to_uint8(recon[0]).astype(int)).max() <= 1
    assert np.abs(from_data_url(got["text"]["swap"]["recon"]).astype(int) - to_uint8(swapped[0]).astype(int)).max() <= 1
    mse = float(((recon - scene["image"][None]) ** 2).mean())
    assert got["text"]["psnr"] == pytest.approx(10 * np.log10(4 / mse), abs=0.02)
    assert got["text"]["token_shape"] == [4, 4] and got["text"]["tokens_picture"].startswith("data:image/png")
    assert got["text"]["tokens_peak"] == pytest.approx(float(z.abs().max()), rel=1e-5)  # the legend's range
    assert "cannot change" in got["notext"]["swap"]["message"]

    _, again = request(url + "api/reconstruct", {"scene": 5, "caption": "a green square on stripes"})
    again = by_name(again["results"])
    assert again["text"]["recon"] != got["text"]["recon"]  # text model: the caption matters
    assert again["notext"]["recon"] == got["notext"]["recon"]  # no-text model: it does not
    assert "swap" not in again["text"]


def test_empty_caption_is_refused_by_text_models_only(served):
    url, _, _ = served
    status, out = request(url + "api/reconstruct", {"scene": 1, "caption": "   "})
    got = by_name(out["results"])
    assert status == 200 and "type a caption" in got["text"]["message"] and "recon" not in got["text"]
    assert got["text"]["needs_caption"]  # the page waits for a caption instead of showing an error
    assert got["notext"]["recon"].startswith("data:image/png")


def test_uploads_good_large_and_bad(served):
    url, _, _ = served
    status, out = request(url + "api/upload", png_bytes(Image.new("RGB", (40, 20), (200, 30, 30))))
    assert status == 200 and from_data_url(out["image"]).shape == (20, 20, 3)
    assert out["notes"] == ["center-cropped from 40×20 to 20×20"]
    status, big = request(url + "api/upload", png_bytes(Image.new("RGB", (1500, 900), (10, 200, 30))))
    assert status == 200 and from_data_url(big["image"]).shape == (512, 512, 3)
    assert "large image (1500×900)" in big["notes"][0]
    status, rec = request(url + "api/reconstruct", {"image": big["image"], "caption": "a green picture"})
    assert status == 200 and all("recon" in r for r in rec["results"])

    status, bad = request(url + "api/upload", b"this is a text file, not a picture\n")
    assert status == 400 and "not an image" in bad["error"]
    status, bad = request(url + "api/upload", png_bytes(Image.new("1", (10_000, 6_000))))
    assert status == 400 and "megapixels" in bad["error"]
    status, bad = request(url + "api/upload", b"\0" * (21 * 2**20))
    assert status == 413 and "MB" in bad["error"]
    status, bad = request(url + "api/reconstruct", {"image": "data:image/png;base64,!!notbase64", "caption": "x"})
    assert status == 400 and "base64" in bad["error"]
    status, bad = request(url + "api/reconstruct", {"caption": "x"})
    assert status == 400 and "pick an image" in bad["error"]
    assert request(url + "api/info")[0] == 200  # still serving


def test_models_added_from_the_page(served, tmp_path):
    url, app, paths = served
    status, out = request(url + "api/models", {"directory": str(tmp_path / "nothing")})
    assert status == 400 and "config.json is missing" in out["error"]
    status, out = request(url + "api/models", {"directory": str(paths["generator"])})
    assert status == 400 and "not a tokenizer" in out["error"]
    count = len(app.models)
    status, out = request(url + "api/models", {"directory": str(paths["notext"]) + "/../notext/"})
    assert status == 200 and out["already_loaded"] and len(app.models) == count  # the same directory: one model
    other = tmp_path / "run2" / "notext"
    load_tokenizer(paths["notext"]).save_pretrained(other)
    status, out = request(url + "api/models", {"directory": str(other)})
    assert status == 200 and not out["already_loaded"] and len(app.models) == count + 1
    names = [m["name"] for m in request(url + "api/info")[1]["models"]]
    assert len(set(names)) == len(names) and out["name"] in names  # two `notext` folders, told apart
    app.models.pop()


def test_samples_follow_seed_and_refuse_bad_requests(served):
    url, app, _ = served
    req = {"label": 2, "n": 3, "seed": 4, "cfg": 2.0, "steps": 3}
    status, a = request(url + "api/generate", req)
    assert status == 200 and len(a["images"]) == 3 and from_data_url(a["images"][0]).shape == (16, 16, 3)
    expected = app.pipe.generate([2] * 3, n=3, steps=3, cfg_scale=2.0, seed=4)
    assert np.abs(from_data_url(a["images"][1]).astype(int) - to_uint8(expected[1]).astype(int)).max() <= 1
    assert request(url + "api/generate", req)[1]["images"] == a["images"]
    assert request(url + "api/generate", {**req, "seed": 5})[1]["images"] != a["images"]
    for bad, words in (({**req, "cfg": 0.5}, "must be >= 1"), ({**req, "label": 99}, "out of range")):
        status, out = request(url + "api/generate", bad)
        assert status == 400 and words in out["error"], out
    for bad, field in (({**req, "n": 99}, "n"), ({**req, "seed": "x"}, "seed"), ({**req, "n": 0}, "n")):
        status, out = request(url + "api/generate", bad)
        assert status == 422 and out["fields"] == [field] and f"'{field}'" in out["error"], out


def test_unexpected_errors_are_one_line_and_the_server_keeps_running(served, monkeypatch, capsys):
    url, app, _ = served

    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(app, "reconstruct", boom)
    status, out = request(url + "api/reconstruct", {"scene": 0, "caption": "x"})
    assert status == 500 and out["error"] == "internal error (RuntimeError: something broke); the server is still running"
    assert "Traceback" in capsys.readouterr().err  # the terminal gets the traceback, the page does not
    assert request(url + "api/nothing")[0] == 404
    status, out = request(url + "api/reconstruct", b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]
    monkeypatch.undo()
    assert request(url + "api/reconstruct", {"scene": 0, "caption": "x"})[0] == 200


def test_discrete_tokenizers_count_codes_in_bits(tmp_path):
    """TiTok (VQ) and ImageFolder load through the registry and report codes x log2(codebook) bits."""
    from textok.models.imagefolder import ImageFolder, ImageFolderConfig
    from textok.models.titok import TiTok, TiTokConfig

    torch.manual_seed(0)
    titok = TiTok(TiTokConfig.preset("titok-tiny"))
    titok.save_pretrained(tmp_path / "titok")
    folder = ImageFolder(ImageFolderConfig.preset("imagefolder-tiny"))
    folder.save_pretrained(tmp_path / "folder")
    app = ServeApp([tmp_path / "titok", tmp_path / "folder"])
    info = by_name(app.info()["models"])
    k = titok.codebook_size
    assert info["titok"]["tokens"]["count"] == titok.config.num_tokens
    assert info["titok"]["tokens"]["bits"] == pytest.approx(titok.config.num_tokens * np.log2(k))
    assert info["folder"]["tokens"]["count"] == folder.config.codes_per_image
    image = CaptionedScenes(image_size=16, split="test")[2]["image"][None]
    got = by_name(app.reconstruct({"scene": 2}, "", "a blue star")["results"])
    with torch.no_grad():
        recon = titok.eval()(image)[0].clamp(-1, 1)
    mse = float(((recon - image) ** 2).mean())
    assert got["titok"]["psnr"] == pytest.approx(10 * np.log10(4 / mse), abs=0.02)
    assert "cannot change" in got["folder"]["swap"]["message"] and got["folder"]["recon"].startswith("data:image/png")


def test_a_port_in_use_is_a_one_line_error(served):
    url, app, _ = served
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(TextokError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
        make_server(app, "127.0.0.1", port)


# ---- issue 23: a maintained stack, typed bodies, only the user's own page, bounded ---------------------------
def test_wrong_json_types_are_refused_naming_the_field_never_500(served):
    url, _, _ = served
    for path, body, field in (("api/reconstruct", {"scene": "1", "caption": "x"}, "scene"),
                              ("api/reconstruct", {"scene": 1, "caption": 5}, "caption"),
                              ("api/reconstruct", {"scene": 1, "caption": ["x"]}, "caption"),
                              ("api/reconstruct", {"scene": 1, "colour": "red"}, "colour"),
                              ("api/generate", {"label": 0, "n": "4"}, "n"),
                              ("api/generate", {"label": 0, "n": True}, "n"),
                              ("api/generate", {"label": 0, "cfg": "x"}, "cfg"),
                              ("api/models", {"directory": 3}, "directory")):
        status, out = request(url + path, body)
        assert status == 422 and field in out["fields"] and f"'{field}'" in out["error"], (body, out)
    for body, words in ((b"[1, 2]", "JSON object"), (b"{not json", "not valid JSON")):
        status, out = request(url + "api/reconstruct", body, headers={"Content-Type": "application/json"})
        assert status == 400 and words in out["error"], out


def test_unknown_paths_and_methods_are_answered_in_json(served):
    url, _, _ = served
    for method in ("PUT", "DELETE", "PATCH"):
        status, out = request(url + "api/reconstruct", {"scene": 1}, method=method)
        assert status == 405 and f"{method} is not allowed" in out["error"] and out["allowed"] == "POST"
    status, out = request(url + "api/info", b"{}", method="POST")
    assert status == 405 and "POST is not allowed" in out["error"]
    conn = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=30)
    conn.request("BREW", "/api/info")
    res = conn.getresponse()
    assert res.status == 405 and json.loads(res.read())["error"].startswith("BREW is not allowed")
    conn.close()
    assert request(url + "static/../../etc/passwd")[0] == 404
    assert request(url + "static/secret.py")[0] == 404


def test_only_this_machines_names_and_own_page_can_drive_it(served):
    """DNS rebinding (a foreign name in Host) reads nothing; another site's page (a foreign Origin) changes nothing."""
    url, app, paths = served
    port = urlparse(url).port
    count = len(app.models)
    load = {"directory": str(paths["notext"])}
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.example", ""):
        for path, body in (("api/info", None), ("", None), ("api/models", load), ("api/reconstruct", {"scene": 1})):
            status, out = request(url + path, body, headers={"Host": host})
            assert status == 403 and "addressed to this machine" in out["error"], (host, path, out)
    for origin in ("http://attacker.example", f"http://attacker.example:{port}", "null", f"http://127.0.0.1:{port + 1}",
                   f"https://127.0.0.1:{port}"):
        for path, body in (("api/models", load), ("api/reconstruct", {"scene": 1, "caption": "x"}),
                           ("api/upload", png_bytes(Image.new("RGB", (8, 8))))):
            status, out = request(url + path, body, headers={"Origin": origin})
            assert status == 403 and "may not change this server" in out["error"], (origin, path, out)
    status, out = request(url + "api/info", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert len(app.models) == count
    for host, origin in ((f"localhost:{port}", f"http://localhost:{port}"), (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
                         (f"[::1]:{port}", f"http://[::1]:{port}")):
        status, out = request(url + "api/reconstruct", {"scene": 1, "caption": "x"}, headers={"Host": host, "Origin": origin})
        assert status == 200, (host, out)
    assert request(url + "api/info", headers={"Sec-Fetch-Site": "same-origin"})[0] == 200


def test_a_wildcard_bind_accepts_ip_literals_but_no_names():
    from textok.apps.serve.guard import Guard

    guard = Guard(None, "0.0.0.0", 7860, {}, 1, 1.0)
    assert guard.host_allowed("192.168.1.20") and guard.host_allowed("localhost")
    assert not guard.host_allowed("attacker.example") and not guard.host_allowed("")
    assert guard.origin_allowed("http://192.168.1.20:7860") and not guard.origin_allowed("http://192.168.1.20:80")
    local = Guard(None, "127.0.0.1", 7860, {}, 1, 1.0)
    assert not local.host_allowed("192.168.1.20") and local.host_allowed("127.0.0.2")


def test_bodies_are_size_limited_and_slow_clients_time_out(served, monkeypatch):
    url, app, _ = served
    status, out = request(url + "api/reconstruct", b"{" + b" " * (41 * 2**20) + b"}")
    assert status == 413 and "MB" in out["error"]
    host, port = urlparse(url).hostname, urlparse(url).port
    conn = http.client.HTTPConnection(host, port, timeout=30)  # chunked: no Content-Length to refuse up front
    conn.request("POST", "/api/upload", body=iter([b"x" * 2**20] * 21), encode_chunked=True,
                 headers={"Content-Type": "application/octet-stream"})
    res = conn.getresponse()
    assert res.status == 413 and "MB" in json.loads(res.read())["error"]
    conn.close()

    from textok.apps.serve import server as server_module

    served_server = app.test_server
    monkeypatch.setattr(served_server.asgi, "body_timeout", 0.5)
    with socket.create_connection((host, port), timeout=30) as sock:  # a body that never finishes
        sock.sendall(f"POST /api/reconstruct HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"scene\"".encode())
        answer = b""
        while b"did not arrive" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer
    monkeypatch.setattr(server_module, "HEADER_TIMEOUT", 0.5)
    with socket.create_connection((host, port), timeout=30) as sock:  # connects and never sends a request
        t0 = time.monotonic()
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHo")
        assert sock.recv(4096) == b"" and time.monotonic() - t0 < 20  # closed by the server
    assert request(url + "api/info")[0] == 200


def test_captions_and_sample_counts_are_checked_before_any_work(served, monkeypatch):
    url, app, _ = served
    from textok.apps.serve import app as app_module

    def no_work(*a, **k):
        raise AssertionError("the text encoder ran for a request that should have been refused")

    monkeypatch.setattr(app_module, "load_text_encoder", no_work)
    long = "a red circle " * 200
    status, out = request(url + "api/reconstruct", {"scene": 1, "caption": long})
    assert status == 422 and out["fields"] == ["caption"]
    with pytest.raises(TextokError, match="limit is 2000"):
        app.reconstruct({"scene": 1}, long)
    with pytest.raises(TextokError, match="1 to 8 samples"):
        app.generate(label=0, n=0)  # 0 is refused, not turned into the default


def test_loaded_models_are_capped_and_deduplicated(tmp_path, monkeypatch, served):
    from textok.apps.serve import app as app_module

    _, _, paths = served
    same = [paths["notext"], str(paths["notext"]) + "/", paths["notext"].parent / "." / "notext"]
    assert len(ServeApp(same).models) == 1
    monkeypatch.setattr(app_module, "MAX_MODELS", 2)
    with pytest.raises(TextokError, match="at most 2"):
        ServeApp([paths["text"], paths["notext"], tmp_path])
    capped = ServeApp([paths["text"], paths["notext"]])
    load_tokenizer(paths["notext"]).save_pretrained(tmp_path / "third")
    with pytest.raises(TextokError, match="2 tokenizers are loaded"):
        capped.add_model(str(tmp_path / "third"))
    assert capped.add_model(str(paths["text"]))["already_loaded"] and len(capped.models) == 2


def test_models_run_outside_the_lock_and_requests_run_in_parallel(served, monkeypatch):
    """Two reconstructions are inside a model at the same time, and the model list stays free meanwhile."""
    url, app, _ = served
    model = next(m for m in app.models if m.model is not None and not m.model.config.uses_text).model
    both_inside = threading.Barrier(2, timeout=30)
    list_free = []
    encode = model.encode

    def slow_encode(*a, **k):
        both_inside.wait()  # raises BrokenBarrierError unless a second request gets here meanwhile
        list_free.append(app.lock.acquire(timeout=5))
        app.lock.release()
        return encode(*a, **k)

    monkeypatch.setattr(model, "encode", slow_encode)
    answers = []
    threads = [threading.Thread(target=lambda i=i: answers.append(request(url + "api/reconstruct", {"scene": i, "caption": "x"})))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a[0] for a in answers] == [200, 200] and list_free == [True, True]
    assert all("recon" in r for a in answers for r in a[1]["results"] if Path(r["directory"]).name == "notext")


def _serve_process(model: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "import sys; from textok.cli import main; sys.exit(main())", "serve", "--port", "0",
           "--model", str(model)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in proc.stdout:
        log.append(line)
        if "ready at " in line:
            return proc, line.split("ready at ", 1)[1].split()[0]
    raise AssertionError("textok serve did not start:\n" + "".join(log))


def test_sigterm_and_ctrl_c_exit_143_and_130(served):
    _, _, paths = served
    running = [_serve_process(paths["notext"]) for _ in range(2)]
    for (proc, url), sig, code in zip(running, (signal.SIGTERM, signal.SIGINT), (143, 130)):
        assert request(url + "api/info")[0] == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, proc.stdout.read()


# ---- the page's names and generators ------------------------------------------------------------------------
def test_two_runs_of_one_recipe_get_different_names():
    from textok.apps.serve.names import distinct_names

    assert distinct_names(["/r/demo/textok/final", "/r/demo2/textok/final"]) == ["demo/textok/final", "demo2/textok/final"]
    assert distinct_names(["/a/x/textok/final", "/b/x/textok/final", "/b/x/baseline/final"]) == \
        ["a/x/textok/final", "b/x/textok/final", "x/baseline/final"]
    assert distinct_names(["/runs/t1", "/runs/t2"]) == ["runs/t1", "runs/t2"]


def test_a_generator_per_tokenizer_and_one_that_does_not_load(served, tmp_path):
    _, _, paths = served
    app = ServeApp([paths["text"], paths["notext"]], [paths["generator"], tmp_path / "nothing"])
    gens = app.info()["generators"]
    names = by_name(app.info()["models"])
    assert gens[0]["tokenizer"] == names["notext"]["name"] and gens[0]["index"] == 0
    assert gens[1]["error"] and "\n" not in gens[1]["error"] and gens[1]["index"] == 1
    out = app.generate(generator=0, label=1, n=2, steps=2)
    assert len(out["images"]) == 2
    with pytest.raises(TextokError, match="did not load"):
        app.generate(generator=1, label=1, n=2)
    with pytest.raises(TextokError, match="does not exist"):
        app.generate(generator=2, label=1, n=2)
