import atexit
import os
import shutil
import tempfile

import pytest

# Tests run many small ops; one thread each keeps the 2-core CI machine responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Analysis results are cached on disk; each test session starts from an empty cache, and removes it after.
if "CFP_CACHE_DIR" not in os.environ:
    os.environ["CFP_CACHE_DIR"] = tempfile.mkdtemp(prefix="cfp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CFP_CACHE_DIR"], ignore_errors=True)

EXAMPLES = ["gpt", "llama", "moe"]


@pytest.fixture(params=EXAMPLES)
def example(request):
    return request.param
