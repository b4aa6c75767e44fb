"""Every link and repository path named in the README, the docs, the chart, the manifests
and the examples resolves inside the repository: relative markdown links (and their
``#anchors``, against the target's headings), and paths written as paths (in backticks in
markdown; anywhere in the chart, manifests and Dockerfiles). A failure lists each broken
reference with its file and line."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Where paths are named for readers.
SOURCES = ("README.md", "CHANGELOG.md", "docs", "charts", "manifests", "examples",
           "operator/Dockerfile")  # fmt: skip
#: Top-level folders: a word starting with one of these and a slash names a repository path.
TOP = ("runtime", "operator", "charts", "docs", "tests", "manifests", "tools", "benchmarks",
       "examples", ".ci")  # fmt: skip
#: Made by `make` (virtualenvs, built tools), not committed: named, never checked.
GENERATED = (".venv", ".tools", ".artifacts")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^(?:\./)?(?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w.*/-]*$")
_WORD = re.compile(r"(?<![\w./-])[\w.*-][\w.*/-]*")


def tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout  # fmt: skip
    return set(out.split())


FILES = tracked()
DIRS = {str(Path(f).parents[i]) for f in FILES for i in range(len(Path(f).parents) - 1)}


def sources() -> list[Path]:
    found = []
    for name in sorted(FILES):
        if name.startswith(SOURCES) and not name.endswith((".tgz", ".png", ".svg")):
            found.append(REPO / name)
    return found


def exists(path: str) -> bool:
    """A committed file or folder (a glob matches at least one); generated paths pass."""
    path = path.removeprefix("./").rstrip("/")
    if not path or path.startswith(GENERATED):
        return True
    if "*" in path:
        return any(Path(f).match(path) or Path(f).match(path + "/*") for f in FILES)
    return path in FILES or path in DIRS


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # GitHub keeps underscores
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE)}


def clean(word: str) -> str:
    """A word without the punctuation around it (a leading dot stays: `.tools/`)."""
    return word.lstrip("(\"'").rstrip(".,;:)\"'")


def references(path: Path, text: str | None = None) -> Iterator[tuple[int, str, str]]:
    """(line, what, problem) for each broken reference in ``path`` (or in ``text``, read as
    if it were that file)."""
    markdown = path.suffix == ".md"
    lines = (path.read_text() if text is None else text).splitlines()
    for number, line in enumerate(lines, 1):
        if markdown:
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                try:
                    inside = resolved.relative_to(REPO).as_posix()
                except ValueError:
                    yield number, target, "points outside the repository"
                    continue
                if file_part and not exists(inside):
                    yield number, target, f"no {inside} in the repository"
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    yield number, target, f"no heading #{anchor} in {inside}"
            candidates = [clean(w) for code in _CODE.findall(line) for w in code.split()]
            # A document's bare name (CHANGELOG.md, in backticks or not) names a file too.
            prose = re.sub(r"\[[^\]]*\]\([^)]*\)|https?://\S+", "", line)
            for word in {clean(w) for w in _WORD.findall(prose)}:
                if re.fullmatch(r"[\w-]+\.md", word) and not any(
                    Path(f).name == word for f in FILES
                ):
                    yield number, word, "no such document in the repository"
        else:
            candidates = [clean(w) for w in _WORD.findall(line)]
        for word in candidates:
            if re.search(r"[<>{}$~]", word) or not _PATH.match(word):
                continue
            if not exists(word) and not exists(str((path.parent / word).relative_to(REPO))):
                yield number, word, "no such path in the repository"


def test_every_link_and_path_resolves() -> None:
    scanned = sources()
    assert any(p.name == "README.md" for p in scanned) and any("charts" in str(p) for p in scanned)
    broken = [f"{p.relative_to(REPO)}:{n}: {what}: {problem}"
              for p in scanned for n, what, problem in references(p)]  # fmt: skip
    assert not broken, "broken references:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("text", "count"),
    [("see [guide](docs/user-guide.md) and `tests/packaging/test_chart.py`", 0),
     ("see [guide](docs/nope.md)", 1), ("see [m](docs/transport.md#measured)", 0),
     ("see [m](docs/transport.md#no-such-heading)", 1), ("run `tools/nope.sh` now", 1),
     ("the `.tools/bin/helm` binary, `~/.cache/x`, `runtime/<pkg>/`", 0),
     ("read `NOPE.md`", 1), ("as NOPE.md says", 1), ("[out](../../etc/passwd)", 1),
     ("[web](https://x.invalid/a)", 0), ("see https://x.invalid/NOPE.md", 0)],
)  # fmt: skip
def test_the_checker_finds_what_is_broken(text: str, count: int) -> None:
    found = list(references(REPO / "probe.md", text))
    assert len(found) == count, found
