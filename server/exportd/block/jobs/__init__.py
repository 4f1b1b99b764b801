"""Block jobs: stream, commit (intermediate and active) and mirror, on the
job layer of exportd.jobs, with a filter node (filter.py) where the job
must see or order the writes to its node."""
