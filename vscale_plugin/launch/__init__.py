"""What every launcher shares: one-line errors and flag parsing, the process group, DeepSpeed configs."""
