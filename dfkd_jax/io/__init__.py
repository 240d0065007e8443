"""Files in and out: checkpoints, saved models, run logs, reports and pictures."""
