"""Verification engines: the interface (`base`), the vllm and hf backends, and the factory that builds them."""
