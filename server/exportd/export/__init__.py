"""Block exports: the generic life cycle (base.BlockExport), the daemon's
export table (table.ExportTable) and the FUSE export (fuse.FuseExport).

Import the submodules directly; this package imports nothing at load time so
that `exportd.export.table` stays cheap for the daemon to import lazily.
"""
