"""nbgrader configuration of the course: the folder that holds this file is the course directory.

    source/<assignment>/<assignment>.ipynb    the instructor versions (solutions and hidden tests)
    release/<assignment>/<assignment>.ipynb   the student versions (`nbgrader generate_assignment`)
    downloaded/<assignment>/archive/          uploads for `nbgrader zip_collect` (<student id>_<notebook>.ipynb)
    submitted/, autograded/, feedback/        what nbgrader writes when collecting, grading, giving feedback

In the book's repository this is book/assignments/ (`make release` writes the student versions the website
shows); an instructor copies this file and source/ into a course directory of their own
(book/assignments/index.md). Beyond nbgrader's defaults it does three things:

* links from the assignments to the book's chapters point to the book's website, since the chapters do
  not travel with a released notebook (SiteLinks, in `generate_assignment`);
* the feedback each student receives shows neither the hidden tests nor tracebacks through them (stock
  nbgrader puts both into the feedback: jupyter/nbgrader#917);
* `zip_collect` reads the student id from the name of each uploaded file.
"""
import pathlib
import posixpath
import re

from nbgrader.converters import GenerateAssignment, GenerateFeedback
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor
from traitlets import Unicode

from gradbook.book import SITE

c = get_config()  # noqa: F821 (provided by nbgrader when it loads this file)

# The book's website, html.baseurl of the repository's _config.yml, as the installed gradbook knows it
# (gradbook.book.SITE; tests keep the two in step). A chapter book/x/y.ipynb is the page <SITE>book/x/y.html.
# Where the source notebooks live in the book's repository: the links in them are relative to this.
SOURCE_IN_REPOSITORY = "book/assignments/source"


class SiteLinks(NbGraderPreprocessor):
    """Point the Markdown links to chapters (`[text](../../../x/y.ipynb)`, relative to the source notebook in
    the book's repository) to the chapter's page on the book's website (`<site>book/x/y.html`)."""

    site = Unicode(SITE, help="The book's website, ending in /").tag(config=True)

    LINK = re.compile(r"(\]\(\s*)([^)\s]+)(\s*\))")

    def _url(self, target, assignment):
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, flags=re.I):   # absolute, or an anchor in the page
            return target
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(SOURCE_IN_REPOSITORY, assignment, path))
        stem, ext = posixpath.splitext(resolved)
        if not resolved.startswith("book/") or ext not in (".ipynb", ".md"):   # the book's pages are in book/
            raise ValueError(f"assignment {assignment}: the link {target!r} leads to {resolved!r}, which is "
                             "not a page of the book; link to a chapter (.ipynb or .md) or to a full URL")
        return self.site + stem + ".html" + ("#" + anchor if anchor else "")

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            assignment = resources["nbgrader"]["assignment"]
            cell.source = self.LINK.sub(lambda m: m[1] + self._url(m[2], assignment) + m[3], cell.source)
        return cell, resources


class FeedbackTracebacks(NbGraderPreprocessor):
    """In check cells, an error's traceback shows the lines around the failing one, hidden tests included:
    keep only its last line, the exception and the message the check wrote for the student."""

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade"):
            for output in cell.get("outputs", []):
                if output.output_type == "error" and output.traceback:
                    output.traceback = output.traceback[-1:]
        return cell, resources


def _default_preprocessors(converter):
    return list(converter.class_traits()["preprocessors"].default())


c.CourseDirectory.root = str(pathlib.Path(__file__).resolve().parent)
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"

# the student version: a stub that tells students what to do (nbgrader's default, with a hint), links to
# the website
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.GenerateAssignment.preprocessors = _default_preprocessors(GenerateAssignment) + [SiteLinks]

# training runs in the check cells take seconds; allow for a slow grading machine
c.Execute.timeout = 600

# feedback: nbgrader's own preprocessors (the grades, the page's style), then the hidden tests removed from the check cells (nbgrader's
# ClearHiddenTests, the one that makes the student version) and tracebacks cut to their message
c.GenerateFeedback.preprocessors = _default_preprocessors(GenerateFeedback) + [ClearHiddenTests, FeedbackTracebacks]

# zip_collect: uploads named <student id>_<notebook>.ipynb, or <student id>_<anything>_<notebook>.ipynb
# (a learning platform's download names); student ids without "_". Adapt this to your platform's names.
c.FileNameCollectorPlugin.named_regexp = r".*/(?P<student_id>[^/_]+)_(?:[^/]*_)?(?P<file_id>[^/_]+\.ipynb)$"
