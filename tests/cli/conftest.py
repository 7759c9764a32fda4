# the end-to-end stack (one marketplace, worker, web server per module), shared with tests/e2e
from tests.e2e.conftest import stack, stack_base  # noqa: F401
