"""Data and rewards: prompt datasets (files, globs, the Hub, mixtures) and reward scoring sources."""
