"""The documentation: the mkdocs site (docs/, mkdocs.yml) builds in strict mode, every page is in its nav,
every relative link of the README and the pages reaches a file and an anchor that exist, the generated
reference pages (scripts/write_docs.py) are current, and the README stays short."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12_000  # bytes (`wc -c`)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")  # mkdocs-material, the theme
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
    return subprocess.run(
        [*command, "--site-dir", str(site)], cwd=config.parent, env=env, capture_output=True, text=True
    )


def test_the_site_builds_in_strict_mode(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


BROKEN = {
    "missing-page": ("runs.md", "[a page](no-such-page.md)\n"),
    "missing-anchor": ("runs.md", "[an anchor](training.md#no-such-anchor)\n"),
    "page-not-in-nav": ("not-in-nav.md", "# Not in the nav\n"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_strict_mode_fails_on_a_broken_link_or_a_page_outside_the_nav(tmp_path, case):
    """What the build above promises: mkdocs.yml makes each of these a warning, --strict a failure."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page, text = BROKEN[case]
    (tmp_path / "docs" / page).write_text(text, encoding="utf-8")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r"no-such-page\.md|no-such-anchor|not-in-nav\.md", output), output


# ---- the nav and the links, checked here too (independent of mkdocs' own settings) ----


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav lists, as paths relative to docs/."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1]
    return re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)\s*$", nav, re.M)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = nav_pages()
    assert len(listed) == len(set(listed)), "a page is listed twice"
    assert set(listed) == pages


def without_code(text: str) -> str:
    """Markdown without its fenced code blocks and code spans (where brackets and '#' are not markup)."""
    text = re.sub(r"^( *)```.*?^\1```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor as mkdocs (Python-Markdown's toc) and GitHub make it (for this project's
    headings: no duplicates, no runs of hyphens)."""
    text = re.sub(r"`|\*\*", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^( *)```.*?^\1```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or anchor in a Markdown file, does not exist."""
    broken = []
    for target in re.findall(
        r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", without_code(page.read_text(encoding="utf-8"))
    ):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def test_every_relative_link_of_the_readme_and_the_pages_exists():
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page) for page in pages}
    assert not {page: links for page, links in broken.items() if links}
    readme_targets = re.findall(r"\]\((docs/[^)#\s]+)", README.read_text(encoding="utf-8"))
    assert {"docs/index.md", "docs/results.md", "docs/reference/cli.md"} <= set(readme_targets)


# ---- the generated reference pages ----


def load_write_docs():
    spec = importlib.util.spec_from_file_location("write_docs", ROOT / "scripts" / "write_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_are_current():
    write_docs = load_write_docs()
    stale = write_docs.stale()
    assert not stale, f"stale, run `python scripts/write_docs.py`: {[p.name for p in stale]}"


def test_write_docs_check_names_a_stale_page_and_fails(tmp_path, capsys):
    write_docs = load_write_docs()
    assert write_docs.main(["--dir", str(tmp_path)]) == 0  # writes them all
    assert write_docs.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "presets.md").write_text("old\n", encoding="utf-8")
    capsys.readouterr()
    assert write_docs.main(["--check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "presets.md" in out and "cli.md" not in out
    assert (tmp_path / "presets.md").read_text(encoding="utf-8") == "old\n"  # --check changes nothing


def test_the_generated_pages_hold_no_addresses_and_cover_every_command_preset_and_name():
    import ddpm
    from ddpm.presets import PRESETS

    pages = {path.name: text for path, text in load_write_docs().pages().items()}
    assert not any(re.search(r"0x[0-9a-f]{6,}", text) for text in pages.values())
    assert all(f"## ddpm {c}\n" in pages["cli.md"] for c in ("train", "sample", "export", "pipeline"))
    assert "### ddpm eval fid\n" in pages["cli.md"] and "`--guidance-interval LO HI`" in pages["cli.md"]
    assert all(f"\n## {name}\n" in pages["presets.md"] for name in PRESETS)
    assert all(f"\n### {name}\n" in pages["api.md"] for name in ddpm.__all__)


# ---- the README ----


def test_the_readme_is_short_and_keeps_the_commands():
    text = README.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    assert size <= README_LIMIT, f"README.md has {size} bytes (at most {README_LIMIT})"
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "bash scripts/pipeline.sh"):
        assert command in text
    assert "CI runs exactly this" in text
