"""`ddpm serve` (ddpm.serve) in a real headless browser (Debian's chromium, driven by selenium): type a
prompt, press Generate, and the images appear at the model's size; bad input is a message on the page.
The Studio behind the page is also checked directly: the same images as `ddpm sample` for the same
request, loaded once for every request."""

import shutil
import socket
import time

import pytest
import torch

from ddpm.errors import ConfigError
from ddpm.images import to_uint8
from ddpm.serve import Request, Studio

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_studio_draws_what_ddpm_sample_draws_and_loads_the_run_once(text_run, monkeypatch):
    import ddpm.sample as sample

    run, _, _ = text_run
    loads = []
    load_run = sample.load_run
    monkeypatch.setattr(sample, "load_run", lambda *a, **k: loads.append(1) or load_run(*a, **k))
    studio = Studio(run)
    request = Request(prompt="a photo of a coat", guidance=2.0, sampler="ddim", steps=3, seed=4, count=3)
    first = studio.draw(request)
    again = studio.draw(Request(**{**request.__dict__, "seed": 5}))
    assert len(loads) == 1  # the second request reused the loaded run
    assert first.shape == (3, 1, 8, 8) and first.dtype == torch.uint8 and not torch.equal(first, again)
    expected = to_uint8(sample.prepare(run, studio.options(request)).draw())  # as `ddpm sample` draws
    assert torch.equal(first, expected)
    with pytest.raises(ConfigError, match="count must be 1 to 64"):
        studio.draw(Request(prompt="a coat", count=0))
    with pytest.raises(ConfigError, match="type a prompt"):
        studio.draw(Request(prompt="   "))


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_a_prompt_typed_in_the_page_gives_images_and_bad_input_a_message(text_run):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ddpm.serve import serve

    run, _, _ = text_run
    port = free_port()
    blocks = serve(run, port=port, block=False)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(f"http://127.0.0.1:{port}/")

        def field(elem_id):
            box = wait.until(
                lambda b: b.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
            )
            box.clear()
            return box

        field("prompt").send_keys("a photo of a coat")
        field("steps").send_keys("3")
        field("count").send_keys("2")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        shown = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img") or False)
        size = "return [arguments[0].naturalWidth, arguments[0].naturalHeight]"
        sizes = [tuple(browser.execute_script(size, img)) for img in shown]
        assert len(shown) >= 2 and set(sizes) == {(8, 8)}

        field("count").send_keys("0")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        message = wait.until(lambda b: "count must be 1 to 64" in b.find_element(By.TAG_NAME, "body").text)
        assert message
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
        blocks.close()
        time.sleep(0.1)


def test_the_page_defaults_to_the_best_measured_few_step_sampler(class_run):
    """sde-dpm++3m with eta 3 on 20 steps (docs/results.md); a sampler without an eta ignores the page's."""
    from ddpm.serve import suggested_eta

    run, _ = class_run
    studio = Studio(run)
    opts = studio.options(Request())
    assert (opts.sampler, opts.steps, opts.eta) == ("sde-dpm++3m", 20, 3.0)
    assert studio.options(Request(sampler="ancestral", steps=3, eta=2.0)).eta is None
    assert studio.options(Request(sampler="ddim")).eta == 0.0  # (not the SDE solvers' 3)
    assert studio.options(Request(eta=0.0)).eta == 0.0  # the probability-flow ODE, as typed
    assert studio.draw(Request(sampler="ancestral", steps=3, count=1)).shape[0] == 1
    assert [suggested_eta(s) for s in ("sde-dpm++2m", "ddim", "edm", "dpm++2m")] == [3.0, 0.0, 10.0, None]


def test_a_class_run_serves_its_classes_and_an_unconditional_run_takes_no_condition(
    class_run, idx_dir, tmp_path
):
    from conftest import tiny_config

    import ddpm.sample as sample
    from ddpm.train import Trainer

    run, _ = class_run
    studio = Studio(run)
    assert studio.conditioning == "class" and len(studio.class_names) == 10
    request = Request(class_name=studio.class_names[1], guidance=1.0, steps=3, seed=2, count=2)
    drawn = studio.draw(request)
    assert torch.equal(drawn, to_uint8(sample.prepare(run, studio.options(request)).draw()))
    with pytest.raises(ConfigError, match="No class"):
        studio.draw(Request(class_name="No class", steps=3, count=2))
    plain = tmp_path / "plain"
    Trainer(tiny_config(idx_dir, steps=2), plain, progress=False).train()
    studio = Studio(plain)
    assert studio.conditioning == "none" and studio.draw(Request(steps=2, count=3)).shape == (3, 1, 8, 8)
