"""Helpers the tests import or launch: tiny models and datasets, a fake Hub, multi-process scripts."""
