"""vhost_min benchmarks: ``python3 -m bench NAME [--json]`` (a table; with --json one JSON object on
the last line). Each benchmark measures ours and a yardstick side by side in the same run."""
