"""Learners, baselines and entry points: ``python -m agents.NAME --env ads-v0``."""
