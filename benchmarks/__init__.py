"""Side-by-side speed and quality measurements (run each bench_*.py as a script)."""
