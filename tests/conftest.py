import os

import pytest

# Tests run many small ops; one thread each keeps the 2-core CI machine responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")

EXAMPLES = ["gpt", "llama", "moe"]


@pytest.fixture(params=EXAMPLES)
def example(request):
    return request.param
