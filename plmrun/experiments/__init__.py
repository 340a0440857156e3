"""Experiment tooling above training: leaderboard records, sweeps, memory/parameter plans."""
