"""backend=vllm against the native engine (`make test-vllm`). A package, so that its conftest is
`backend_vllm.conftest` and never shadows tests/conftest.py for `from conftest import ...`."""
