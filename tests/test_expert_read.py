"""Guards for the prose corrections of an expert's read (issue 20) that no computation can check: who
introduced what, what a paper derived, which sources a passage must cite. Each test names the mistake it
keeps from coming back."""
import json
import pathlib
import re

BOOK = pathlib.Path(__file__).resolve().parents[1] / "book"


def prose(path: str) -> str:
    nb = json.loads((BOOK / path).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_relu_credits_glorot2011_for_deep_networks_and_names_gated_variants():
    text = prose("vanishing/relu.ipynb")
    assert not re.search(r"popularized for deep networks by\s+\{cite:t\}`nair2010`", text)
    assert "glorot2011" in text and "shazeer2020" in text and "SwiGLU" in text
    assert "the usual activation of Transformer" not in text


def test_the_edge_of_stability_and_adamw_are_cited():
    assert re.search(r"edge of stability.{0,400}|cohen2021", prose("exploding/consequences.ipynb"), re.S)
    assert "cohen2021" in prose("exploding/consequences.ipynb")
    reg = prose("exploding/regularization.ipynb")
    assert all("loshchilov2019" in p for p in re.split(r"\n\s*\n", reg) if "AdamW" in p)


def test_the_initialization_assignment_says_he_derives_both_passes():
    text = prose("assignments/source/initialization/initialization.ipynb")
    assert "forward pass only" not in text
    assert "fan-out" in text and "either one suffices" in text


def test_the_clipping_exercise_names_only_thresholds_the_chapter_tested():
    text = prose("exploding/clipping.ipynb")
    assert "($0.1$ and $1$)" not in text
    assert "threshold that worked above ($c = 1$)" in text
