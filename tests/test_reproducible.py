"""Two runs of a chapter under the same seed produce identical figures and printed numbers."""
import base64

import nbformat
from nbclient import NotebookClient
from notebook_runner import ROOT


def _outputs(path, seed, monkeypatch):
    monkeypatch.setenv("GRADBOOK_SEED", str(seed))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    images, texts = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                images.append(base64.b64decode(data["image/png"]))
            if "text/plain" in data:
                texts.append(data["text/plain"])
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                texts.append(out["text"])
    return images, texts


def test_same_seed_same_figures(monkeypatch):
    path = ROOT / "book" / "gradients-through-depth.ipynb"
    first = _outputs(path, 5, monkeypatch)
    second = _outputs(path, 5, monkeypatch)
    assert first[0], "the chapter produced no figure"
    assert len(first[0]) == len(second[0])
    assert all(a == b for a, b in zip(first[0], second[0])), "a figure differs between two runs with the same seed"
    assert first[1] == second[1], "printed numbers differ between two runs with the same seed"
