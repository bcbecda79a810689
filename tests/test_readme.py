"""The README's code for practitioners ("Using gradbook on your own model") runs as written.

Each Python block of that section is run verbatim in a fresh process, in an empty temporary folder, without
any of our GRADBOOK_* variables. A block that presumes names of the reader's own (``model``, ``inputs``,
``opt``, ``loader``, ...) gets them from a prelude that defines exactly those, as a reader's script would
before pasting the block; the prelude never touches gradbook. On a machine without CUDA the block's
``torch.autocast("cuda")`` and ``GradScaler()`` turn themselves off with a warning, as they would for the
reader.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What each block presumes the reader already has: a small model and batch, an optimizer, a loader.
PRELUDE = textwrap.dedent("""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 4))
    inputs, targets = torch.randn(32, 16), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.functional.cross_entropy
    loader = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(12)]
    accumulate = 2

    class wandb:                      # stands in for the reader's experiment tracker
        logged = []

        @staticmethod
        def log(values, step=None):
            wandb.logged.append((step, values))
""")

# After each block: what it must have produced, checked in the same process.
AFTER = {
    0: "assert diag.verdict in ('vanishing', 'exploding', 'healthy', 'cannot tell')\nassert 'Verdict' in diag.report()",
    1: "assert w.trace.weight_grad_norm.shape[1] == 21 and hist.diverged is None",
    2: ("assert len(w.trace) == 6 and w.trace.update_ratio.shape == (6, 7)\n"
        "assert len(wandb.logged) == 6 and list(pathlib.Path('runs/exp1').glob('events.out.tfevents.*'))"),
}


def _blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using gradbook on your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_blocks_this_test_knows():
    assert len(_blocks()) == len(AFTER), "a block was added to or removed from the README: update AFTER"


@pytest.mark.parametrize("k", sorted(AFTER))
def test_readme_block_runs_as_written(k, tmp_path):
    pytest.importorskip("tensorboard")
    code = "\n".join(["import pathlib", "import matplotlib; matplotlib.use('Agg')", PRELUDE, _blocks()[k], AFTER[k]])
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADBOOK_")}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
