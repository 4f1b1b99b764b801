"""The event loop's helpers, below every other package of exportd.

    threads.py   work in threads: in_own_thread (calls that may hang on a
                 mount, with a timeout), in_io_thread (bounded pool for data I/O)
    resume.py    resumable requests: start_eagerly() runs a coroutine inline
                 until it first waits; Resume continues it (in a task)
    perloop.py   PerLoop: one shared object per event loop
"""
