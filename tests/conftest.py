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


def pytest_configure(config):
    """Fixtures write their h5ad files with whatever pandas makes of text (pandas 3: its string
    dtype, which anndata writes only when allowed). annotate's own output converts text itself,
    which tests/test_annotate.py checks with this allowance turned off."""
    import anndata

    if hasattr(anndata.settings, "allow_write_nullable_strings"):
        anndata.settings.allow_write_nullable_strings = True
