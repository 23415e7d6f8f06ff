"""Synthetic reproductions of Raghu et al. 2021 (learned rotation, noisy-label weights, exactness).

``python -m tasks synthetic {rotation,noisy,exactness} --config {smoke,paper}``; see cli.py and
RESULTS.md (settings, measured numbers and the exact commands).
"""
