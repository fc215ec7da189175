"""The published law of capacity gap, the prior for users who cannot run a sweep."""

PAPER_RATIO = 2.5
PAPER_FAMILIES = ("GPT-2", "Pythia")
CITATION = '"Towards the Law of Capacity Gap in Distilling Language Models" (Zhang et al., 2023, arXiv:2311.07052)'
