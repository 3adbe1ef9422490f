"""srt-serve: the HTTP API on a store and index built by the real extraction job, its refusals,
and the page in a real browser (Debian's chromium, headless, driven by Selenium)."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.commands.service.app import create_app
from pipeline.commands.service.batching import Batcher, Busy
from pipeline.commands.service.catalog import Catalog
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DescriptorSpec, build_index, load_index, save_index, vectors_of
from tests.images_factory import encode, write_files
from tests.retrieval_set import write_retrieval_set

ROOT = Path(__file__).resolve().parent.parent
K = 5
MAX_PIXELS = 4_000_000  # the store's --max-pixels: above the photos' (retina: 2 M), below the bomb's 9 M


def bomb() -> bytes:
    return encode(Image.new("L", (3000, 3000)), "PNG")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """24 photos and a broken file, extracted, and a flat index of their pooled descriptors."""
    folder = tmp_path_factory.mktemp("serve")
    write_retrieval_set(folder / "images")
    write_files(folder / "images", {"broken.jpg": b"not an image"})
    store = str(folder / "store.zarr")
    run_local(ExtractConfig(dataset=str(folder / "images"), out=store, model="vit_tiny_patch16_224", image_size=64, radius=1, stride=8, max_pixels=MAX_PIXELS))
    index = str(folder / "photos.index")
    save_index(build_index(FeatureStore.open(store), DescriptorSpec("pooled")), index)
    return {"folder": folder, "store": store, "index": index}


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    app = create_app(Catalog([served["index"]]), max_upload_bytes=200_000, max_concurrent=2)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def photo(served, name: str = "coffee_flip.jpg") -> bytes:
    return (served["folder"] / "images" / name).read_bytes()


def test_search_by_a_stored_image_named_every_way(client, served):
    store = FeatureStore.open(served["store"])
    image_id = store.find("coffee_flip")
    uri = store.record(image_id)["uri"]
    answers = [client.get("/api/search", params={"image": name, "k": K}) for name in (image_id, "coffee_flip.jpg", "coffee_flip", uri)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    results = [a.json()["results"] for a in answers]
    assert all(r == results[0] for r in results) and len(results[0]) == K
    assert results[0][0]["image_id"] == image_id and results[0][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [r["rank"] for r in results[0]] == list(range(K)) and all(a["score"] >= b["score"] for a, b in zip(results[0], results[0][1:]))


def test_a_flat_index_answers_stored_queries_with_the_stored_descriptor(served):
    """The vector read from the index is the one read from the store, so no store read is needed."""
    store, index = FeatureStore.open(served["store"]), load_index(served["index"])
    assert index.keeps_vectors
    for image_id in index.ids.column("image_id").to_pylist()[:5]:
        np.testing.assert_array_equal(index.indexed_vector(image_id), vectors_of(store, [image_id], index.spec)[0])
    assert index.indexed_vector("no-such-image") is None


def test_requests_that_wait_together_are_served_in_one_call():
    calls: list[list[int]] = []
    started, release = threading.Event(), threading.Event()

    def handle(items):
        calls.append(list(items))
        started.set()
        release.wait(30)
        return [item * 10 for item in items]

    batcher = Batcher(handle, bound=16, name="test-batcher")
    first = batcher.submit(0)
    assert started.wait(30)  # the first call is running: the next ten wait together
    waiting = [batcher.submit(i) for i in range(1, 11)]
    with pytest.raises(Busy):
        [batcher.submit(i) for i in range(11, 18)]  # over the bound of 16 waiting
    release.set()
    assert first.result(30) == 0 and [f.result(30) for f in waiting] == [i * 10 for i in range(1, 11)]
    assert calls[0] == [0] and calls[1][:10] == list(range(1, 11))


def test_search_by_an_upload_runs_the_stores_model(client, served):
    answer = client.post("/api/search", params={"k": K}, files={"image": ("coffee_flip.jpg", photo(served), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    best = answer.json()["results"][0]
    assert best["image_id"] == FeatureStore.open(served["store"]).find("coffee_flip") and best["score"] == pytest.approx(1.0, abs=1e-2)


def test_thumbnails_summary_and_pictures(client, served):
    thumbnail = client.get("/api/thumbnail", params={"image": "coffee_flip.jpg", "size": 64})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) == 64
    summary = client.get("/api/summary").json()
    assert (summary["images"], summary["ok"], summary["errors"]) == (25, 24, {"decode": 1})
    assert summary["config"]["model"] == "vit_tiny_patch16_224" and summary["vectors"] == 24 and summary["run"]["ok"] == 24
    pictures = client.get("/api/pictures", params={"image": "coffee_flip"})
    assert pictures.status_code == 200 and pictures.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(pictures.content))).shape[1] == 3 * 256  # original | plain | SRT
    assert client.get("/docs").status_code == 200 and "/api/search" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("../../../../etc/passwd", 404),
        ("/etc/passwd", 404),
        ("file:///etc/passwd", 404),
        ("s3://elsewhere/photo.jpg", 404),
        ("https://example.com/photo.jpg", 404),
        ("%2e%2e%2fstore.zarr%2fzarr.json", 404),
        ("", 404),
        ("broken.jpg", 422),  # a row of the store, but no image
    ],
)
def test_thumbnails_only_of_images_in_the_manifest(client, name, status):
    answer = client.get("/api/thumbnail", params={"image": name})
    assert answer.status_code == status and "\n" not in answer.json()["detail"], answer.text


@pytest.mark.parametrize(
    ("request_args", "status", "says"),
    [
        (("get", "/api/search", {"params": {"image": "no_such_photo"}}), 404, "no image 'no_such_photo'"),
        (("get", "/api/search", {"params": {"image": "broken.jpg"}}), 422, "has no features"),
        (("get", "/api/search", {"params": {"image": "coffee_flip", "k": 0}}), 422, "k: "),
        (("get", "/api/search", {"params": {"image": "coffee_flip", "k": "many"}}), 422, "k: "),
        (("get", "/api/search", {}), 422, "image: "),
        (("get", "/api/search", {"params": {"image": "coffee_flip", "index": "nope"}}), 404, "no index 'nope'"),
        (("post", "/api/search", {"files": {"image": ("notes.txt", b"this is text", "text/plain")}}), 400, "decode: not an image"),
        (("post", "/api/search", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}), 400, "the upload is empty"),
        (("post", "/api/search", {"files": {"image": ("bomb.png", bomb(), "image/png")}}), 413, "exceeds --max-pixels"),
        (("post", "/api/search", {"files": {"image": ("big.bin", b"\xff" * 300_000, "image/jpeg")}}), 413, "--max-upload-mb"),
        (("post", "/api/search", {"content": iter([b"\xff" * 100_000] * 4), "headers": {"content-type": "multipart/form-data; boundary=x"}}), 413, "--max-upload-mb"),  # chunked
        (("post", "/api/search", {"data": {"image": "not a file"}}), 422, "image: "),
        (("post", "/api/search", {"content": b"\x00\x01garbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}), 400, "multipart"),
        (("get", "/api/pictures", {"params": {"image": "broken.jpg"}}), 422, "no features"),
        (("get", "/api/thumbnail", {"params": {"image": "coffee_flip", "size": 100000}}), 422, "size: "),
        (("get", "/api/summary", {"params": {"index": "../x"}}), 404, "no index"),
    ],
)
def test_malformed_requests_get_a_4xx_and_a_one_line_reason(client, served, request_args, status, says):
    method, path, kwargs = request_args
    answer = getattr(client, method)(path, **kwargs)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and says in detail and "\n" not in detail and "Traceback" not in detail
    assert str(served["folder"]) not in detail  # never the server's paths


def test_answers_quote_names_cut_short_and_show_no_server_path(client, served):
    long_name = "x" * 12_000
    detail = client.get("/api/search", params={"image": long_name}).json()["detail"]
    assert len(detail) < 400 and "(12000 characters)" in detail and str(served["folder"]) not in detail
    hint = detail.split("(e.g. ")[1].rstrip(")")
    assert client.get("/api/search", params={"image": hint}).status_code == 200  # the hint names an image with features
    listed = client.get("/api/indexes").json()
    summary = client.get("/api/summary").json()
    assert str(served["folder"]) not in str(listed) + str(summary["store"]) + str(summary["config"])


def test_a_full_uri_must_be_a_stored_uri_however_spelled(client, served):
    stored = str(served["folder"] / "images" / "coffee_flip.jpg")
    assert client.get("/api/search", params={"image": stored}).status_code == 200
    assert client.get("/api/search", params={"image": "file://" + stored}).status_code == 200
    for elsewhere in ("file:///elsewhere/coffee_flip.jpg", "/elsewhere/coffee_flip.jpg", "s3://other-bucket/coffee_flip.jpg"):
        answer = client.get("/api/search", params={"image": elsewhere})
        assert answer.status_code == 404 and "no image" in answer.json()["detail"], (elsewhere, answer.text)


@pytest.mark.parametrize(("page", "needed"), [("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})])
def test_docs_are_served_without_a_cdn(client, page, needed):
    html = client.get(page)
    assert html.status_code == 200 and "cdn" not in html.text.lower() and "https://" not in html.text
    assets = [part.split('"')[0] for part in html.text.split('"/docs-assets/')[1:]]
    assert needed <= set(assets)
    for asset in assets:
        served_asset = client.get(f"/docs-assets/{asset}")
        assert served_asset.status_code == 200 and len(served_asset.content) > 500, asset


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory) -> dict:
    """Three photos extracted twice: vectors only (--outputs cls,pooled), and whole (--resize aspect),
    each with its index; the second's images are changed by the tests after extraction."""
    folder = tmp_path_factory.mktemp("small")
    write_retrieval_set(folder / "images")
    names = sorted(p.name for p in (folder / "images").iterdir())[:3]
    for extra in sorted((folder / "images").iterdir())[3:]:
        extra.unlink()
    indexes = {}
    for name, flags in (("vectors", {"outputs": ("cls", "pooled")}), ("aspect", {"resize": "aspect"})):
        store = str(folder / f"{name}.zarr")
        run_local(ExtractConfig(dataset=str(folder / "images"), out=store, model="vit_tiny_patch16_224", image_size=64, radius=1, stride=8, **flags))
        indexes[name] = str(folder / f"{name}.index")
        save_index(build_index(FeatureStore.open(store), DescriptorSpec("pooled")), indexes[name])
    return {"folder": folder, "names": names, **indexes}


def test_pictures_of_a_store_without_dense_maps_or_of_a_changed_source_are_4xx(small_stores):
    folder, names = small_stores["folder"], small_stores["names"]
    with TestClient(create_app(Catalog([small_stores["vectors"], small_stores["aspect"]])), raise_server_exceptions=False) as client:
        assert [(i["name"], i["pictures"]) for i in client.get("/api/indexes").json()] == [("vectors.index", False), ("aspect.index", True)]
        answer = client.get("/api/pictures", params={"image": names[0], "index": "vectors.index"})
        assert answer.status_code == 422 and "has no dense maps (extracted with --outputs cls,pooled)" in answer.json()["detail"]
        assert client.get("/api/pictures", params={"image": names[0], "index": "aspect.index"}).status_code == 200
        (folder / "images" / names[1]).write_bytes(b"replaced by a text file")
        (folder / "images" / names[2]).unlink()
        for route in ("/api/pictures", "/api/thumbnail"):
            replaced = client.get(route, params={"image": names[1], "index": "aspect.index"})
            deleted = client.get(route, params={"image": names[2], "index": "aspect.index"})
            assert (replaced.status_code, deleted.status_code) == (422, 404), (route, replaced.text, deleted.text)
            assert "cannot be shown: decode" in replaced.json()["detail"] and "cannot be shown: read" in deleted.json()["detail"]
            assert str(folder) not in replaced.json()["detail"] + deleted.json()["detail"]


def test_an_upload_whose_model_input_would_be_too_large_is_413_under_every_policy(small_stores):
    """A 1 x 2,000 PNG is 2,000 pixels, far under --max-pixels, but --resize aspect makes it a
    64 x 128,000 input: over --max-tokens."""
    with TestClient(create_app(Catalog([small_stores["aspect"]])), raise_server_exceptions=False) as client:
        sliver = encode(Image.new("RGB", (2000, 1), (90, 120, 30)), "PNG")
        answer = client.post("/api/search", files={"image": ("sliver.png", sliver, "image/png")})
        assert answer.status_code == 413 and "over --max-tokens 16384" in answer.json()["detail"], answer.text


def test_pictures_are_bounded_and_kept(served, monkeypatch):
    from pipeline.commands.service import catalog as catalog_module

    drawn, computing, release = [], threading.Event(), threading.Event()
    real_render = catalog_module.render

    def held(*args, **kwargs):
        drawn.append(args[1])
        computing.set()
        release.wait(60)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(catalog_module, "render", held)
    app = create_app(Catalog([served["index"]]), max_concurrent=1)
    answers: list = []
    with TestClient(app, raise_server_exceptions=False) as client:
        first = threading.Thread(target=lambda: answers.append(client.get("/api/pictures", params={"image": "coffee_flip"})))
        first.start()
        assert computing.wait(120)
        refused = client.get("/api/pictures", params={"image": "coffee_flip"})
        release.set()
        first.join(60)
        again = client.get("/api/pictures", params={"image": "coffee_flip"})
    assert refused.status_code == 503 and "--max-concurrent" in refused.json()["detail"]
    assert answers[0].status_code == 200 and again.status_code == 200 and again.content == answers[0].content
    assert len(drawn) == 1  # the second request of the same image was answered from the kept pictures


def test_the_api_fuzzed_from_its_own_schema_never_answers_5xx(served):
    """schemathesis draws requests from /openapi.json (bounded in examples and time); no route may
    answer a server error, whatever the parameters."""
    import hypothesis
    import schemathesis

    app = create_app(Catalog([served["index"]]), max_upload_bytes=200_000, max_concurrent=2)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        strategy = operation.ok().as_strategy()

        @hypothesis.settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=strategy)
        def fuzz(case) -> None:
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.query, response.status_code, response.text[:200]))

        fuzz()
    assert not failures, failures


def test_uploads_beyond_the_bound_are_answered_503(served):
    """--max-concurrent uploads wait for the model at once; one more is told to come back."""
    catalog = Catalog([served["index"]])
    computing, release = threading.Event(), threading.Event()
    describe = catalog.describe

    def held(requests):  # the model, busy until released
        computing.set()
        release.wait(60)
        return describe(requests)

    catalog.describe = held
    app = create_app(catalog, max_concurrent=1)
    upload = {"files": {"image": ("coffee_flip.jpg", photo(served), "image/jpeg")}, "params": {"k": 1}}
    answers: list = []
    with TestClient(app, raise_server_exceptions=False) as client:
        post = threading.Thread(target=lambda: answers.append(client.post("/api/search", **upload)))
        post.start()
        assert computing.wait(120)  # the first upload is in the model
        waiting = threading.Thread(target=lambda: answers.append(client.post("/api/search", **upload)))
        waiting.start()
        while app.state.uploads.waiting.qsize() < 1:  # the second waits in the queue
            time.sleep(0.01)
        refused = client.post("/api/search", **upload)
        release.set()
        post.join(60)
        waiting.join(60)
    assert refused.status_code == 503 and "try again" in refused.json()["detail"]
    assert sorted(a.status_code for a in answers) == [200, 200]


def test_a_stale_index_is_refused_at_start(served, tmp_path):
    """Re-extracted with another config since the index was built: refused, as srt-query refuses it."""
    store = tmp_path / "store.zarr"
    shutil.copytree(served["store"], store)
    index = tmp_path / "photos.index"
    save_index(build_index(FeatureStore.open(str(store)), DescriptorSpec("pooled")), str(index))
    run_local(ExtractConfig(dataset=str(served["folder"] / "images"), out=str(store), model="vit_tiny_patch16_224", image_size=64, radius=1, stride=8, max_pixels=MAX_PIXELS, seed=1, overwrite=True))
    with pytest.raises(ValueError, match="rebuild it"):
        Catalog([str(index)])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(served):
    """The real command, as a user starts it, on loopback; its output goes to a file."""
    port = free_port()
    log = served["folder"] / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--index", served["index"], "--port", str(port)], stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        while process.poll() is None:  # until it listens (the test's timeout bounds the wait)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        assert process.poll() is None and f"serving     photos.index at http://127.0.0.1:{port}/" in log.read_text(), log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def test_the_page_in_a_real_browser(server, served, tmp_path):
    """Load the page, upload an image, see K thumbnails, open an image's feature pictures."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    assert chromium and driver, "the browser test needs Chromium and ChromeDriver on PATH: `make browser` installs Debian's (see the README)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server + "/")
        wait.until(lambda b: "24 ok" in b.find_element(By.ID, "summary").text)
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys(str(K))
        upload = tmp_path / "query.jpg"
        upload.write_bytes(photo(served))
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figure.neighbour")) == K)
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in b.find_elements(By.CSS_SELECTOR, "figure.neighbour img")))
        first = browser.find_elements(By.CSS_SELECTOR, "figure.neighbour")[0]
        assert first.get_attribute("data-image-id") == FeatureStore.open(served["store"]).find("coffee_flip")
        shown = browser.find_element(By.ID, "query-shown")  # the uploaded query above its neighbours
        assert shown.is_displayed() and browser.find_element(By.ID, "query-name").text == "query.jpg (uploaded)"
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", browser.find_element(By.ID, "query-image"))
        first.click()
        pictures = wait.until(seen.visibility_of_element_located((By.ID, "pictures")))
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", pictures) == 3 * 256)
        browser.save_screenshot(str(tmp_path / "page.png"))

        name = browser.find_element(By.ID, "name")  # a search by name says the name typed, and shows that image
        name.send_keys("coffee_flip")
        name.submit()
        status = browser.find_element(By.ID, "status")
        wait.until(lambda b: status.text == f"{K} neighbours of coffee_flip")
        wait.until(lambda b: b.find_element(By.ID, "query-name").text == "coffee_flip")
        browser.find_element(By.ID, "file").send_keys(str(upload))  # an upload clears the name typed before
        wait.until(lambda b: b.find_element(By.ID, "query-name").text == "query.jpg (uploaded)")
        assert name.get_attribute("value") == ""

        browser.execute_script("document.getElementById('name').value = 'x'.repeat(100000)")  # past the box's limit
        name.submit()
        wait.until(lambda b: "error" in status.get_attribute("class"))
        assert status.text.startswith("400 Bad Request") and len(status.text) < 300, status.text

        browser.get(server + "/docs")  # Swagger UI from the package's own files: no network needed
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) >= 5)
    finally:
        browser.quit()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_the_404_hint_names_an_image_with_features_not_an_error_row(tmp_path, sample_paths):
    """The manifest's first row is a file that is no image: the hint must skip it."""
    folder = tmp_path / "images"
    write_files(folder, {"0-broken.jpg": b"not an image", sample_paths[0].name: sample_paths[0].read_bytes()})
    store = str(tmp_path / "store.zarr")
    run_local(ExtractConfig(dataset=str(folder), out=store, model="vit_tiny_patch16_224", image_size=32, radius=1, stride=8))
    assert FeatureStore.open(store).manifest.sort_by("row").column("status").to_pylist() == ["error", "ok"]
    index = str(tmp_path / "store.index")
    save_index(build_index(FeatureStore.open(store), DescriptorSpec("pooled")), index)
    with TestClient(create_app(Catalog([index])), raise_server_exceptions=False) as client:
        detail = client.get("/api/search", params={"image": "nothing-like-it"}).json()["detail"]
    assert detail.endswith(f"(e.g. {sample_paths[0].name})"), detail
    with pytest.raises(KeyError, match=rf"\(e\.g\. {sample_paths[0].name}\)"):
        FeatureStore.open(store).find("nothing-like-it")
