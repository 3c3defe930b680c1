"""The run side: turn a plan into a run, start it through a backend, follow it, and keep the measured peak.

Nothing here imports torch, transformers or a backend's SDK at module level: the web app and the CLI
import this package to render, store and supervise runs. Only `launcher.entry` (the program a run
executes) and `launcher.events` (its callback) import the training stack, inside the run's process.
"""
