"""Tiny on-disk inputs for CLI tests: a corpus of small Python files."""
from pathlib import Path


def write_docs(folder: Path, line: str, repeats: int, files: int = 4) -> Path:
    """Write ``doc{i}.py`` files, each ``line.format(i=i, j=j)`` for j < repeats; returns the folder."""
    folder.mkdir(exist_ok=True)
    for i in range(files):
        (folder / f"doc{i}.py").write_text("".join(line.format(i=i, j=j) for j in range(repeats)))
    return folder

