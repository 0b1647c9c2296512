import os

os.environ.setdefault("SLF_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import slf_utils  # noqa: E402,F401  (sets the offline switches before torch & co are imported)

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tests"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def debs_dir():
    """Debian voice packages, downloaded once and kept between test runs."""
    d = CACHE / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def demo_corpus_small(debs_dir):
    """A 4-identity demo corpus (built once, kept in .cache/tests between runs). Returns the manifest path."""
    from slf_utils import demo_corpus

    return demo_corpus.build(CACHE / "corpus4", identities=4, seed=0, debs_dir=debs_dir)
