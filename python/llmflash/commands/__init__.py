"""The `llmflash` verbs that have parsers of their own (calibrate, eval, bench, profile-disk) and
verify's report: argument parsing, tables and plots, and the drivers that need the strategies or
the model API (evaluation.py, benchmark.py). Above llmflash.api; llmflash.cli imports them.

Importing a command module stays cheap (no torch): `llmflash --help` and usage errors answer at
once, so each verb imports what it runs inside the function that runs it.
"""
