"""What else a steering changes: other tasks, open generation and the served policy, each beside its controls."""
