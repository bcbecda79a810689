"""The instructor's path of book/assignments/index.md, followed as written.

The page's ```bash blocks are run as they stand, in order, like a terminal session (the working folder and
the environment carry over from one block to the next), in a temporary home folder (so the page's
`~/course` is a fresh course directory) and in an environment without any GRADBOOK_* variable:

* the first block activates the book's environment, copies the course and generates the student versions;
* then students fill in their notebooks: for every assignment the reference solution ("correct"), the
  untouched student version ("blank"), and one student per planted mistake (tests/test_assignments.py);
  they upload them, and the block with `nbgrader validate` runs in a student's folder;
* the remaining blocks collect, autograde, export the grades and generate the feedback; the block that
  starts the formgrader (`jupyter lab`, a server) is not run: the test checks that its extension is on.

Then: every reference solution gets full marks, every planted mistake loses exactly its task's points, the
blank versions fail only in their checks and only with "not implemented yet", no feedback page shows a line
of a hidden test (nor, for the blank versions, of a solution), autograde's checksum warnings are the ones
the page explains, and the student versions link to the book's website.
"""
import csv
import os
import pathlib
import re
import subprocess
from collections import Counter

import nbformat
import pytest
import yaml

from test_assignments import ASSIGNMENTS, COURSE, MISTAKES, NOT_IMPLEMENTED, ROOT, _distinctive_lines, _meta, \
    _source, _text

PAGE = COURSE / "index.md"


def _page_blocks():
    """The ```bash blocks of the page, in order (indented ones, inside list items, included)."""
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```$", PAGE.read_text(), flags=re.S | re.M)
    return [re.sub(rf"^{indent}", "", body, flags=re.M).strip() for indent, body in blocks]


def _commands(block):
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


def _is_student(block):
    return any(c.startswith("nbgrader validate") for c in _commands(block))


def _is_server(block):
    return any(c.startswith("jupyter lab") for c in _commands(block))


def _environment(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADBOOK_")}
    env.pop("VIRTUAL_ENV", None)
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return env


class Terminal:
    """A terminal session: each block runs in bash (stopping at the first failing command), and the working
    folder and the environment it leaves are those of the next block."""

    def __init__(self, cwd, env, state):
        self.cwd, self.env, self.state = pathlib.Path(cwd), env, state
        self.output = []

    def run(self, block, cwd=None, keep=True, check=True):
        state = self.state / f"{len(self.output)}"
        script = f"set -eo pipefail\n{block}\npwd > '{state}.pwd'\nenv -0 > '{state}.env'\n"
        proc = subprocess.run(["bash", "-c", script], cwd=cwd or self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=1500)
        out = proc.stdout + proc.stderr
        self.output.append((block, out))
        if check:
            assert proc.returncode == 0, f"the page's block\n{block}\nfailed:\n{out[-5000:]}"
        if keep and proc.returncode == 0:
            self.cwd = pathlib.Path(pathlib.Path(f"{state}.pwd").read_text().strip())
            self.env = dict(kv.split("=", 1) for kv in pathlib.Path(f"{state}.env").read_text().split("\0") if "=" in kv)
        return out


def _submission(release, name, mistake=None):
    """The student version with every solution cell filled in from the source (markers removed), one
    mistake planted if given."""
    answers = {_meta(c)["grade_id"]: c.source for c in _source(name).cells if _meta(c).get("solution")}
    nb = nbformat.read(release / name / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        grade_id = _meta(cell).get("grade_id")
        if grade_id in answers:
            text = "\n".join(ln for ln in answers[grade_id].splitlines() if "### BEGIN SOLUTION" not in ln
                             and "### END SOLUTION" not in ln)
            if mistake and mistake[1] == grade_id:
                for old, new in mistake[2]:
                    assert old in text, f"planted mistake: {old!r} not found in {grade_id}"
                    text = text.replace(old, new)
            cell.source = text
    return nb


STUDENTS = {name: {"correct": None, "blank": "blank"} for name in ASSIGNMENTS}
for _i, _mistake in enumerate(MISTAKES):
    STUDENTS[_mistake[0]][f"mistake{_i}"] = _mistake


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """Follow the page; returns (course folder, {block kind: output})."""
    home = tmp_path_factory.mktemp("home")
    state = tmp_path_factory.mktemp("state")
    blocks = _page_blocks()
    assert blocks and "generate_assignment" in blocks[0], "the page's first bash block generates the assignments"
    term = Terminal(ROOT, _environment(home), state)
    outputs = {"generate": term.run(blocks[0])}
    root = term.cwd
    assert root == home / "course", f"the first block leaves the terminal in {root}, not in ~/course"
    release = root / "release"

    # students: fill in, validate (in a folder of their own), upload for zip_collect
    for name, students in STUDENTS.items():
        for student, mistake in students.items():
            nb = nbformat.read(release / name / f"{name}.ipynb", as_version=4) if mistake == "blank" \
                else _submission(release, name, mistake)
            archive = root / "downloaded" / name / "archive"
            archive.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, archive / f"{student}_{name}.ipynb")
    for block in blocks[1:]:
        if _is_server(block):
            assert _commands(block) == ["jupyter lab"], block
            outputs["server"] = term.run("jupyter server extension list", keep=False)
        elif _is_student(block):
            for student in ("correct", "blank"):
                folder = home / f"student-{student}"
                folder.mkdir()
                (folder / "backprop.ipynb").write_bytes(
                    (root / "downloaded" / "backprop" / "archive" / f"{student}_backprop.ipynb").read_bytes())
                outputs[f"validate-{student}"] = term.run(block, cwd=folder, keep=False, check=student == "correct")
        else:
            out = term.run(block)
            for kind in ("zip_collect", "autograde", "export", "generate_feedback"):
                if kind in block:
                    outputs[kind] = out
    for kind in ("server", "validate-correct", "zip_collect", "autograde", "export", "generate_feedback"):
        assert kind in outputs, f"the page has no bash block for {kind}"
    return root, outputs


@pytest.fixture(scope="module")
def grades(course):
    """(assignment, student) -> {check cell: (score, max score)}, from the gradebook autograde wrote."""
    root, _ = course
    from nbgrader.api import Gradebook
    result = {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        for name, students in STUDENTS.items():
            for student in students:
                sub = gradebook.find_submission_notebook(name, name, student)
                result[name, student] = {g.name: (g.score, g.max_score) for g in sub.grades}
    return result


def _points(name):
    return {_meta(c)["grade_id"]: _meta(c)["points"] for c in _source(name).cells if _meta(c).get("grade")}


# -- marks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_reference_solution_gets_full_marks(course, grades, name):
    assert grades[name, "correct"] == {test: (p, p) for test, p in _points(name).items()}
    # and grades.csv, written by the page's `nbgrader export`, says the same
    rows = [r for r in csv.DictReader((course[0] / "grades.csv").open())
            if r["assignment"] == name and r["student_id"] == "correct"]
    assert len(rows) == 1 and float(rows[0]["score"]) == float(rows[0]["max_score"]) == sum(_points(name).values())


@pytest.mark.parametrize("i", range(len(MISTAKES)), ids=[f"{m[0]}-{m[1]}" for m in MISTAKES])
def test_planted_mistake_loses_exactly_its_points(grades, i):
    name, _, _, loses = MISTAKES[i]
    scores = grades[name, f"mistake{i}"]
    assert scores.keys() == _points(name).keys() and loses in scores
    for test, (score, most) in scores.items():
        assert most == _points(name)[test]
        assert score == (0 if test == loses else most), f"{test}: {score} of {most} ({scores})"


def test_every_task_has_a_planted_mistake():
    tasks = {(name, grade_id) for name in ASSIGNMENTS for grade_id in _points(name)}
    assert tasks == {(m[0], m[3]) for m in MISTAKES}


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_student_version_fails_only_in_its_checks(course, grades, name):
    """The untouched student version, autograded: no points, and the only errors are check cells reporting
    in words that a function is not implemented yet."""
    assert all(score == 0 for score, _ in grades[name, "blank"].values()), grades[name, "blank"]
    nb = nbformat.read(course[0] / "autograded" / "blank" / name / f"{name}.ipynb", as_version=4)
    stubs = [c for c in nbformat.read(course[0] / "release" / name / f"{name}.ipynb", as_version=4).cells
             if _meta(c).get("solution")]
    assert stubs and all("raise NotImplementedError()" in c.source for c in stubs)
    failed = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                grade_id = _meta(cell).get("grade_id")
                failed.append(grade_id)
                assert _meta(cell).get("grade"), f"{name}: cell {grade_id!r}, not a check cell, raised {out.ename}: {out.evalue}"
                assert out.ename == "AssertionError" and NOT_IMPLEMENTED in out.evalue, \
                    f"{name}: check {grade_id!r} failed with {out.ename}: {out.evalue}"
    assert failed == list(_points(name)), "every check must fail"


def test_validate_tells_students(course):
    _, outputs = course
    assert "Success! Your notebook passes all the tests." in outputs["validate-correct"], outputs["validate-correct"][-3000:]
    assert "Success!" not in outputs["validate-blank"] and NOT_IMPLEMENTED in outputs["validate-blank"]


def test_formgrader_is_enabled(course):
    """The page's `jupyter lab` offers the formgrader: nbgrader's server extension is enabled and loads."""
    out = course[1]["server"]
    assert re.search(r"nbgrader\.server_extensions\.formgrader\s+.*enabled", out) and "OK" in out, out


def test_checksum_warnings_are_the_ones_the_page_explains(course):
    """For every submission, autograde warns once per check cell (all of which hold hidden tests) and about
    no other cell: the known nbgrader behaviour the page describes."""
    out = course[1]["autograde"]
    warned = Counter(re.findall(r"Attribute 'checksum' for cell (\S+) has changed!", out))
    expected = Counter()
    for name, students in STUDENTS.items():
        for test in _points(name):
            expected[test] += len(students)
    assert warned == expected
    assert "jupyter/nbgrader#1961" in PAGE.read_text()


# -- no secret leaks -------------------------------------------------------------------------------------

def _secret_lines(name):
    """(solution lines, hidden-test lines): the lines of each kind of region that identify it (a hidden-test
    line that is also in a solution is left out, since students write solutions)."""
    solutions = [ln for lines in _distinctive_lines(name, kinds=("SOLUTION",)) for ln in lines]
    hidden = [ln for lines in _distinctive_lines(name, kinds=("HIDDEN TESTS",)) for ln in lines
              if not any(ln in s for s in solutions)]
    return solutions, hidden


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_feedback_shows_no_hidden_test(course, name):
    root = course[0]
    solutions, hidden = _secret_lines(name)
    assert hidden
    for student in STUDENTS[name]:
        page = root / "feedback" / student / name / f"{name}.html"
        assert page.exists(), f"no feedback for {student} in {name}"
        text = _text(page)
        # tracebacks (which show the lines around the failing one) only for errors outside the check cells
        autograded = nbformat.read(root / "autograded" / student / name / f"{name}.ipynb", as_version=4)
        errors = [_meta(c).get("grade", False) for c in autograded.cells for o in c.get("outputs", [])
                  if o.output_type == "error"]
        assert text.count("Traceback (most recent call last)") == errors.count(False), f"{page}: tracebacks"
        leaked = [ln for ln in hidden if ln in text]
        assert not leaked, f"{page.relative_to(root)} shows hidden tests: {leaked}"
        if student == "blank":
            leaked = [ln for ln in solutions if ln in text]
            assert not leaked, f"{page.relative_to(root)} shows solutions: {leaked}"
        # the feedback still shows what each failing check said
        for cell in autograded.cells:
            for out in cell.get("outputs", []):
                if out.output_type == "error" and _meta(cell).get("grade"):
                    assert f"{out.ename}: {out.evalue.splitlines()[0]}" in text, f"{page}: {out.evalue}"
        if student == "blank":
            in_code = _text(root / "release" / name / f"{name}.ipynb").count(NOT_IMPLEMENTED)
            assert text.count(NOT_IMPLEMENTED) == in_code + len(_points(name)), text[-3000:]
    # autograding itself did run the hidden tests: they are in the instructor's autograded notebooks
    assert all(ln in _text(root / "autograded" / "correct" / name / f"{name}.ipynb") for ln in hidden)


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_no_solution_in_the_student_notebooks(course, name):
    copies = [course[0] / "release" / name / f"{name}.ipynb"]
    released = COURSE / "release" / name / f"{name}.ipynb"      # what `make release` made for the website
    copies += [released] if released.exists() else []
    for path in copies:
        text = _text(path)
        for lines in _distinctive_lines(name):
            leaked = [ln for ln in lines if ln in text]
            assert not leaked, f"{path}: {leaked}"


# -- links ------------------------------------------------------------------------------------------------

def _site():
    return yaml.safe_load((ROOT / "_config.yml").read_text())["html"]["baseurl"]


def test_course_config_names_the_configured_site():
    """The course's configuration takes the site from gradbook, whose address is _config.yml's."""
    import gradbook

    config = (COURSE / "nbgrader_config.py").read_text()
    assert re.search(r"^from gradbook\.book import SITE$", config, flags=re.M)
    assert gradbook.book.SITE == _site()


def _links(path):
    nb = nbformat.read(path, as_version=4)
    return [m for c in nb.cells if c.cell_type == "markdown" for m in re.findall(r"\]\(\s*([^)\s]+)", c.source)]


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_student_versions_link_to_the_website(course, name):
    """Every link of a student version is a full address; those into the book are pages of the website,
    made from chapters the repository holds, the same chapters the source notebook links to."""
    site = _site()
    copies = [course[0] / "release" / name / f"{name}.ipynb"]
    released = COURSE / "release" / name / f"{name}.ipynb"
    copies += [released] if released.exists() else []
    source_links = _links(COURSE / "source" / name / f"{name}.ipynb")
    assert source_links
    expected = []
    for link in source_links:
        target = (COURSE / "source" / name / link.split("#")[0]).resolve().relative_to(ROOT)
        assert (ROOT / target).exists(), f"{name} links to {link}, which does not exist"
        expected.append(site + str(target.with_suffix(".html")))
    for path in copies:
        links = _links(path)
        assert links == expected, f"{path}: {links}"


def test_site_links_reject_links_that_leave_the_book(tmp_path):
    """A relative link that is not a chapter of the book cannot be made into an address: a clear error."""
    from traitlets.config import Config
    namespace = {"get_config": Config, "__file__": str(COURSE / "nbgrader_config.py")}
    exec(compile((COURSE / "nbgrader_config.py").read_text(), "nbgrader_config.py", "exec"), namespace)
    links = namespace["SiteLinks"]()
    resources = {"nbgrader": {"assignment": "backprop"}}
    cell = nbformat.v4.new_markdown_cell("[a](../../../vanishing/activations.ipynb#the-sigmoid) [b](https://x.org/y)")
    assert links.preprocess_cell(cell, resources, 0)[0].source == \
        f"[a]({_site()}book/vanishing/activations.html#the-sigmoid) [b](https://x.org/y)"
    for bad in ("../../../../README.md", "../../../../../elsewhere.ipynb", "data.csv"):
        with pytest.raises(ValueError, match="not a page of the book"):
            links.preprocess_cell(nbformat.v4.new_markdown_cell(f"[x]({bad})"), resources, 0)
