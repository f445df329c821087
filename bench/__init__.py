"""localflow benchmarks: each stage as a ratio to its raw-client ceiling, measured in the same run."""
