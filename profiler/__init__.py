"""NetProfiler: exact per-connection network accounting for batch-system jobs."""
