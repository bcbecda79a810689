"""The course assignments (book/assignments, nbgrader format): the source notebooks, the planted mistakes, and
no secret on the website.

* the source notebooks are well formed (points, hidden tests, a points table that matches the cells); that
  they pass their own tests is checked by nbval, which collects them with every notebook under book/;
* MISTAKES: one typical mistake per task, each of which must cost exactly the points of its task;
* no solution or hidden test leaks into the built website (check_site_has_no_solutions, run by
  tests/test_book.py after its build).

The instructor's path itself (generate, validate, collect, autograde, feedback: the commands of
book/assignments/index.md, run as written) is tests/test_instructor_path.py, which grades the reference
solutions and the planted mistakes.
"""
import html
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSE = ROOT / "book" / "assignments"
ASSIGNMENTS = sorted(p.name for p in (COURSE / "source").iterdir() if p.is_dir())
NOT_IMPLEMENTED = "is not implemented yet"

# One planted mistake per task: (assignment, solution cell, [(text, replacement), ...], test cell that must
# lose its points). Each is a mistake students make; each must cost exactly the points of its own task.
MISTAKES = [
    ("backprop", "numerical_gradient", [("w[i] = old - eps\n", "w[i] = old\n"), ("/ (2 * eps)", "/ eps")],
     "test_numerical_gradient"),                                            # one-sided difference
    ("backprop", "backward", [("(delta @ weights[l]) * h_prev * (1 - h_prev)", "delta @ weights[l]")],
     "test_backward"),                                                      # sigmoid derivative forgotten
    ("backprop", "norms", [("(1 / (len(norms) - 1))", "(1 / len(norms))")], "test_norms"),  # k steps, not k-1
    ("initialization", "xavier_uniform", [("np.sqrt(6 / (fan_in + fan_out))", "np.sqrt(2 / (fan_in + fan_out))")],
     "test_xavier"),                                                        # std used as the bound
    ("initialization", "he_normal", [("np.sqrt(2 / fan_in)", "np.sqrt(2 / fan_out)")], "test_he"),
    ("initialization", "predicted_variances", [("(c / 2) ** np.arange(depth)", "c ** np.arange(depth)")],
     "test_predicted"),                                                     # the ReLU's 1/2 forgotten
    ("initialization", "measured_variances",
     [("variances.append(np.var(a))\n        h = np.maximum(a, 0)", "h = np.maximum(a, 0)\n        variances.append(np.var(h))")],
     "test_measured"),                                                      # post- instead of pre-activations
    ("batchnorm", "batchnorm_forward", [("np.sqrt(x.var(axis=0) + eps)", "np.sqrt(x.var(axis=0))")],
     "test_forward"),                                                       # eps forgotten
    ("batchnorm", "batchnorm_backward",
     [("dx = (g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0)) / std", "dx = g / std")],
     "test_backward"),                                                      # batch statistics as constants
    ("batchnorm", "make_net", [("[linear, nn.BatchNorm1d(100), nn.Sigmoid()]", "[linear, nn.Sigmoid(), nn.BatchNorm1d(100)]")],
     "test_make_net"),                                                      # BN after the sigmoid
    ("clipping", "clip_by_norm",
     [("    if total > max_norm:\n        for g in grads:\n            g.mul_(max_norm / total)\n",
       "    for g in grads:\n        if float(g.norm()) > max_norm:\n            g.mul_(max_norm / float(g.norm()))\n")],
     "test_clip"),                                                          # each tensor clipped on its own
    ("clipping", "train",
     [("        if clip:\n            clip_by_norm(model.parameters(), max_norm)\n", ""),
      ("                p -= lr * p.grad\n",
       "                p -= lr * p.grad\n        if clip:\n            clip_by_norm(model.parameters(), max_norm)\n")],
     "test_train"),                                                         # clipped after the update
    ("clipping", "success_rate", [("np.mean(losses < threshold)", "np.mean(losses[np.isfinite(losses)] < threshold)")],
     "test_success_rate"),                                                  # diverged runs dropped
]


def _meta(cell):
    return cell.metadata.get("nbgrader", {})


def _source(name):
    return nbformat.read(COURSE / "source" / name / f"{name}.ipynb", as_version=4)


def _regions(text, kind):
    """The bodies of the ### BEGIN <kind> ... ### END <kind> regions of a cell's source."""
    return re.findall(rf"### BEGIN {kind}\n(.*?)\n\s*### END {kind}", text, flags=re.S)


def _text(path):
    """What a reader sees: for HTML, the text without tags (code is split into highlighted spans); for a
    notebook, the source of its cells."""
    text = path.read_text(errors="replace")
    if path.suffix == ".html":
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
    elif path.suffix == ".ipynb":
        text = "\n".join(c.source for c in nbformat.reads(text, as_version=4).cells)
    return text


def _chapters_text():
    """The text of the book's own pages: a line that appears there is no secret of an assignment."""
    pages = [p for p in (ROOT / "book").rglob("*") if p.suffix in {".md", ".ipynb"}
             and not {"assignments", "_build", ".ipynb_checkpoints"} & set(p.parts)]
    return "\n".join(_text(p) for p in pages)


def _distinctive_lines(name, chapters="", kinds=("SOLUTION", "HIDDEN TESTS")):
    """From each solution and hidden-test region (or only those of `kinds`), the lines that appear nowhere
    else in the notebook (nor in `chapters`)."""
    nb = _source(name)
    regions = [r for c in nb.cells for kind in kinds for r in _regions(c.source, kind)]
    outside = "\n".join(re.sub(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n.*?### END \1", "", c.source, flags=re.S)
                        for c in nb.cells) + chapters
    outside += "\n" + outside.replace("`", "")         # prose quotes code as `x`; a page shows it as x
    found = []
    for region in regions:
        lines = [ln.strip() for ln in region.splitlines()]
        lines = [ln for ln in lines if len(ln) >= 20 and ln not in outside]
        assert lines, f"{name}: a region has no line of 20 characters that identifies it:\n{region}"
        found.append(lines)
    return found


# -- the source notebooks -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_source_notebook_is_well_formed(name):
    nb = _source(name)
    ids = [_meta(c)["grade_id"] for c in nb.cells if _meta(c)]
    assert len(ids) == len(set(ids)), f"{name}: duplicate grade_id"
    graded = [c for c in nb.cells if _meta(c).get("grade")]
    solutions = [c for c in nb.cells if _meta(c).get("solution")]
    assert len(graded) >= 3 and len(solutions) >= 3
    for c in graded:
        assert _meta(c)["points"] > 0 and _regions(c.source, "HIDDEN TESTS"), f"{_meta(c)['grade_id']}: points and hidden tests"
        assert "call(" in c.source, f"{_meta(c)['grade_id']}: call the student's functions through call() for readable failures"
    for c in solutions:
        assert _regions(c.source, "SOLUTION"), f"{_meta(c)['grade_id']}: a solution cell without a solution region"
    # the points table of the introduction lists every task with the points its check cell carries
    table = [int(p) for p in re.findall(r"^\| \d+ \|.*\| (\d+) \|$", nb.cells[0].source, flags=re.M)]
    assert table == [_meta(c)["points"] for c in graded], f"{name}: the points table says {table}"
    total = re.search(r"\*\*Total\*\* \| \*\*(\d+)\*\*", nb.cells[0].source)
    assert total and int(total.group(1)) == sum(table)
    assert nb.metadata["mystnb"]["execution_mode"] == "off"   # the website shows the stubs unexecuted


# -- no solution leaks onto the website ----------------------------------------------------------------

def check_site_has_no_solutions(site):
    """No line of a solution or hidden test appears anywhere on the built site (run by tests/test_book.py,
    after its build)."""
    for name in ASSIGNMENTS:
        assert (site / "book" / "assignments" / "release" / name / f"{name}.html").exists(), f"{name} page missing"
    files = [p for p in site.rglob("*") if p.is_file() and p.suffix in {".html", ".ipynb", ".txt", ".md", ".py"}]
    files.append(site / "searchindex.js")
    texts = {p: _text(p) for p in files}
    chapters = _chapters_text()
    for name in ASSIGNMENTS:
        for lines in _distinctive_lines(name, chapters):
            for path, text in texts.items():
                leaked = [ln for ln in lines if ln in text]
                assert not leaked, f"{path.relative_to(site)} shows a solution of {name}: {leaked}"
