"""qcow2 images through FUSE exports of a real exportd process (issue 6).

test_read        every variant reads as `qemu-img convert -O raw`
test_write       random writes/punch/zero/qemu-io through the export, then
                 check, compare, snapshots intact, seek vs map (tests/support/qcow2_roundtrip.py)
test_combos      the same round trip on variant combinations
test_seek        SEEK_DATA/SEEK_HOLE vs `qemu-img map`
test_fallocate   punch-hole/zero-range (incl. past EOF), then check/compare/holes
test_concurrency parallel writers sharing clusters with a reader; two overlays
test_graph       a named backing chain, every layer exported at once
test_resize      grow/shrink through a growable export
test_kill9       kill -9 during a write storm; writethrough zeroing durability
"""
