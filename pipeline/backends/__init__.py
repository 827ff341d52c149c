"""Generation backends (the `vllm` branch carries only `vllm.py`; the registry and the protocol
come with the backend seam on main)."""
