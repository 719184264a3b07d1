import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/launch.py


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Token files go to a folder of this test session, never into the user's `datasets` cache:
    the first run of the session tokenizes the bundled corpus, every later one maps it. Trainer
    processes inherit the variable (launch.child_env copies os.environ)."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets_cache")),
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield Path(os.environ["HF_DATASETS_CACHE"]) / "course_tokens"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
