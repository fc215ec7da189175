"""The errors hf_capgap raises, under one base class so callers (and ``hf-capgap``) can catch them all.

An error whose cause is the caller's input also subclasses ``ValueError``, so code that caught
``ValueError`` before these classes existed still catches them. This module imports nothing, so every
room of the package, ``hf_capgap.utils`` and the torch-free ``hf_capgap.law`` included, can use it.
"""

from __future__ import annotations


class HfCapgapError(Exception):
    """Base of every error hf_capgap raises on purpose."""


class ConfigError(HfCapgapError, ValueError):
    """A setting or argument is invalid or contradicts another one; the message names the fix."""


class ModelFolderError(HfCapgapError, ValueError):
    """A local model folder lacks files loading needs (tokenizer, safetensors weights), or holds only pickles."""
