"""The documentation: every Python block of README.md and docs/ runs as written (in a fresh
interpreter, default devices), the README stays a front page, and the site builds strictly."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Guides whose blocks build on each other (a later block reads what an earlier one wrote):
# their own tests run them in order in one directory (tests/test_docs_<guide>.py).
IN_ORDER = ("docs/guides/models-and-serving.md", "docs/guides/training-features.md")


def _blocks() -> dict[str, str]:
    """`{"page:n": source}` of every ```python block; a block repeated on another page (the
    README's example is also in the multi-device guide) runs once, under its first name."""
    blocks: dict[str, str] = {}
    for page in PAGES:
        if str(page.relative_to(ROOT)) in IN_ORDER:
            continue
        found = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
        for i, source in enumerate(found):
            if source not in blocks.values():
                blocks[f"{page.relative_to(ROOT)}:{i}"] = source
    return blocks


BLOCKS = _blocks()


def test_the_docs_have_code_blocks_and_the_readme_is_a_front_page():
    assert any(name.startswith("README.md:") for name in BLOCKS), "README lost its example"
    assert sum(name.startswith("docs/guides/own-model.md:") for name in BLOCKS) >= 4
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"


@pytest.mark.compat
@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKS))
def test_docs_block_runs(name, tmp_path):
    # jaxnets as installed (editable in .venv, the wheel in .venv-compat), default devices.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", BLOCKS[name]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    if last.startswith("{"):  # examples that train print their metrics: they must have learned
        assert ast.literal_eval(last)["accuracy"] > 0.5, last


def test_shell_blocks_name_real_commands(capsys):
    """The ```sh blocks are commands, not Python: each `make T` names a Makefile target, each
    `jaxnets C` a subcommand of the console script, each extra in `pip install '.[x]'` an extra
    of pyproject.toml."""
    import tomllib

    from jaxnets import __main__ as cli

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    commands = set()
    for command in ("doctor", "run"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        commands.add(command)
    seen = 0
    for page in PAGES:
        for block in re.findall(r"^```sh\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.splitlines():
                line = line.split("#", 1)[0].strip()
                seen += 1
                if line.startswith("make "):
                    assert line.split()[1] in targets, f"{page.name}: {line}"
                elif line.startswith("jaxnets "):
                    assert line.split()[1] in commands, f"{page.name}: {line}"
                for extra in re.findall(r"\.\[([\w,]+)\]", line):
                    assert set(extra.split(",")) <= extras, f"{page.name}: {line}"
    assert seen >= 5


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed here (the `docs` extra)")
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "losses" / "index.html").is_file()
