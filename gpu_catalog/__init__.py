"""GPU facts (one reviewed data file) and lookup by fuzzy name; NVML detection lives in detect.py."""
