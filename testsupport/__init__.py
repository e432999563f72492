"""Real-service fixtures for the tests; see the root conftest.py."""
