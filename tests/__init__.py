"""Tests, grouped like the package (tests/<stage>/); shared fixtures in conftest.py, helper scripts in helpers/."""
