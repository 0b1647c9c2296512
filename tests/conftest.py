import os

os.environ.setdefault("SLF_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import slf_utils  # noqa: E402,F401  (sets the offline switches before torch & co are imported)

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tests"
E2E = Path(__file__).resolve().parent / "e2e"


# Three tiers: tests/unit (no training, no corpus), tests/integration (tiny presets, synthetic stores, small corpora)
# and tests/e2e (grids, papermill, the paper path, faults, benchmarks, the environment). Everything in tests/e2e, and
# the few end-to-end tests that stay beside their module's other tests, carry the `slow` mark: `make test` deselects
# it, `make test-all` (CI) runs it.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A results folder with a synthetic store (4 identities x 4 clips, 32 px faces; each identity its own gender x
    ethnicity) for helpers.write_params's grid files."""
    from slf_utils.synthetic import synthetic_store

    tmp = tmp_path_factory.mktemp("project")
    synthetic_store(tmp / "results" / "store", n_identities=4, clips_per_identity=4, face_size=32)
    return tmp


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


# the known-answer corpora of the tests (issue 26): 30 identities x 3 images (1 train, 2 held out), 90 clips a strength
KA_SMALL = {"identities": 30, "images_per_identity": 3, "seed": 0}


@pytest.fixture(scope="session")
def ka_small_settings():
    return dict(KA_SMALL)


@pytest.fixture(scope="session")
def ka_cache(debs_dir):
    """The known-answer builder's cache (faces, espeak-ng), kept in .cache/tests beside the Debian packages."""
    return CACHE / "known_answer"


@pytest.fixture(scope="session")
def ka_small(ka_cache):
    """A known-answer corpus at link strength 1 (built once, kept in .cache/tests). Returns the corpus folder."""
    from slf_utils import known_answer as ka

    ka.build(CACHE / "ka30-s1", cache=ka_cache, progress=False, link_strength=1.0, **KA_SMALL)
    return CACHE / "ka30-s1"


@pytest.fixture(scope="session")
def ka_small_null(ka_cache, ka_small):
    """The same faces at link strength 0 (the null control); only the voices are made again."""
    from slf_utils import known_answer as ka

    ka.build(CACHE / "ka30-s0", cache=ka_cache, progress=False, link_strength=0.0, **KA_SMALL)
    return CACHE / "ka30-s0"
