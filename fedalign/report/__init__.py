"""What a run reports: metrics rows, trackers, plots."""
