"""exportd benchmark harness: images, peers, fio workloads, control plane, reports.

Run it through ``bench/run.py`` (``make bench``); see bench/README.md.
"""
