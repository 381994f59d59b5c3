"""The --html page rendered by real headless Chromium: its DOM (rows, SVG, cost text) and a screenshot's pixels."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pop_fx import PopConfig
from pop_fx.tools.models import tiny_model

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: "
                                                         "apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"  # a fresh profile per run
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=True)


class _Dom(HTMLParser):
    """Counts what the rendered DOM holds: elements by tag and class, and the text."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, int] = {}
        self.tags: dict[str, int] = {}
        self.in_svg = 0
        self.svg_tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "tr":
            self.rows[a.get("class", "")] = self.rows.get(a.get("class", ""), 0) + 1
        if tag == "svg":
            self.in_svg += 1
        elif self.in_svg:
            self.svg_tags[tag] = self.svg_tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_svg -= 1

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from pop_fx.tools.html_report import render
    from pop_fx.tools.inspect import inspect

    model = tiny_model("llama")
    rep = inspect(model, PopConfig(sparsity=0.5, candidate_ratio=0.1))
    path = tmp_path_factory.mktemp("html") / "inspect.html"
    path.write_text(render(rep), encoding="utf-8")
    return model, rep, path


def test_rendered_dom(page, tmp_path):
    model, rep, path = page
    html = path.read_text(encoding="utf-8")
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    dom = _Dom()
    dom.feed(_chromium(tmp_path, "--dump-dom", path.as_uri()).stdout)
    assert dom.rows.get("site") == model.config.num_hidden_layers
    assert dom.rows.get("graph") == len(rep.graphs) == 2
    assert dom.tags.get("svg", 0) == 4  # the first site: decode and prefill, before and after
    assert dom.svg_tags.get("rect", 0) >= 4 * 5 and dom.svg_tags.get("path", 0) >= 4 * 5
    text = " ".join(dom.text)
    assert "Cost per decode step" in text and "γ/3" in text and "6*b*d*f" in text
    assert "pop.decode" in text and "2.85%" in text and "3.48%" in text


def test_screenshot_shows_the_graph(page, tmp_path):
    import matplotlib.image

    _, _, path = page
    png = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1200,1600", path.as_uri())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = (matplotlib.image.imread(png)[..., :3] * 255).round()
    assert img.shape[:2] == (1600, 1200)
    # The pop:: op boxes are filled #ffd9a8: the SVG was laid out and painted, not just parsed.
    orange = ((abs(img[..., 0] - 0xFF) <= 2) & (abs(img[..., 1] - 0xD9) <= 2) & (abs(img[..., 2] - 0xA8) <= 2)).sum()
    assert orange > 500, orange
