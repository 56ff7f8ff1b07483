import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


import pytest  # noqa: E402

from helpers import toy_collection  # noqa: E402


@pytest.fixture
def collection(tmp_path):
    """Two labelled human datasets and an unlabelled mouse one, genes overlapping."""
    return toy_collection(tmp_path)
