"""AIGIS against supervisord and circus with N trivial external plugins: ``make bench``.

``proctable`` reads the process table, ``peers`` installs the peers, ``tools`` renders each tool's
config and knows its commands, ``measure`` times one tool, ``report`` formats tables (pure), and
``benchmarks/run.py`` interleaves it all.
"""
