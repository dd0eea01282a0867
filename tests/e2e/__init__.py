"""End-to-end tests against a real Open WebUI (see conftest.py)."""
