"""Every chapter's asserted claims hold under GRADBOOK_SEED=1 too (seed 0 is run by nbval and the build)."""
import pytest

from notebook_runner import ROOT, chapters, run


@pytest.mark.parametrize("path", chapters(), ids=lambda p: str(p.relative_to(ROOT)))
def test_claims_hold_under_seed_1(path):
    run(path, seed=1)
