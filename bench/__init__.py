"""Benchmarks, run on demand (``make bench``); each prints ratios against a reference
measured in the same run, never absolute pass/fail times."""
