from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)
