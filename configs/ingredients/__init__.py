"""The ingredients of ``ex_maest.py``, one module per concern (as imitation's scripts/config).

Each module holds an ingredient, its config scope (the one place where each key's default lives,
with a comment on every key) and the captured factories that build its part from its config.
"""
