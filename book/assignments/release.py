"""Generate the student versions of the assignments: `python book/assignments/release.py` (or `make release`).

Runs `nbgrader generate_assignment` for every assignment in source/ whose student version in release/ is
missing or older than its source or than the course's configuration (nbgrader_config.py, which also points
the student versions' links to the book's website), without a gradebook database (the release folder is
git-ignored; the book's site shows these student versions). Pass --force to regenerate all of them.
"""
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def outdated(name: str) -> bool:
    released = HERE / "release" / name / f"{name}.ipynb"
    sources = [p for p in (HERE / "source" / name).rglob("*") if p.is_file()]
    sources += [HERE / "nbgrader_config.py", pathlib.Path(__file__).resolve()]
    return not released.exists() or max(p.stat().st_mtime for p in sources) > released.stat().st_mtime


def main(force: bool = False) -> None:
    for folder in sorted(p for p in (HERE / "source").iterdir() if p.is_dir()):
        if force or outdated(folder.name):
            subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", folder.name, "--no-db",
                            "--force", "--log-level=ERROR"], cwd=HERE, check=True)
            print(f"released {folder.name}")


if __name__ == "__main__":
    main(force="--force" in sys.argv[1:])
