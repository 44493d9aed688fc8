"""Runs: what happens around training: checks before anything loads, the run directory, trackers, completion logs, run
health, preflight, inspect and plots.
"""
