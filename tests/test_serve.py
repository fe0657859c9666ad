"""``textok serve`` without a browser: the JSON API over a real socket, checked against the library's own output.

The browser test (test_serve_browser.py) drives the page; this file checks what the page is sent.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import urllib.error
import urllib.request
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from serve_models import make_models

from textok.apps.serve import ServeApp, make_server
from textok.apps.serve.pictures import to_uint8
from textok.cli import build_parser
from textok.data.scenes import CaptionedScenes
from textok.models.registry import load_tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    paths = make_models(tmp_path_factory.mktemp("serve"))
    app = ServeApp([paths["text"], paths["notext"], paths["bad"]], paths["generator"])
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, app, paths
    server.shutdown()
    server.server_close()


def request(url: str, data: bytes | dict | None = None) -> tuple[int, dict]:
    body = json.dumps(data).encode() if isinstance(data, dict) else data
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
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
    return {r["name"]: r for r in results}


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
    assert info["generator"]["classes"][:2] == ["circle", "square"] and info["generator"]["kind"] == "dit"


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
    status, out = request(url + "api/models", {"directory": str(paths["notext"])})
    assert status == 200 and out["name"] == "notext" and len(app.models) == count + 1
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
    for bad, words in (({**req, "cfg": 0.5}, "must be >= 1"), ({**req, "n": 99}, "1 to 8"), ({**req, "label": 99}, "out of range"),
                       ({**req, "seed": "x"}, "whole numbers")):
        status, out = request(url + "api/generate", bad)
        assert status == 400 and words in out["error"], out


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
    from textok.errors import TextokError

    url, app, _ = served
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(TextokError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
        make_server(app, "127.0.0.1", port)
