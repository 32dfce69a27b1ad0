"""The `llmflash` verbs, one module each: argument parsing, tables and plots. convert, generate
and verify `register` with the top-level parser; calibrate, eval, bench and profile-disk parse
their own arguments (`main(argv)`). evaluation.py and benchmark.py are the drivers behind eval and
bench (they run the strategies and the model API), args.py the parser that exits with code 2,
texts.py the calibration and held-out text. Above llmflash.api; llmflash.cli imports them.

Importing a command module stays cheap (no torch): `llmflash --help` and usage errors answer at
once, so each verb imports what it runs inside the function that runs it.
"""
