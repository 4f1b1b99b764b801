"""The QMP interface as data: schema/ loaded, checked against, rendered.

    schema      loads schema/, validates arguments and events, QEMU's error texts
    quickcheck  a fast "valid" answer in front of jsonschema (never more lenient)
    introspect  query-qmp-schema: schema/ in QEMU's SchemaInfo format
    keyval      QEMU's command-line syntax (key=value,a.b=c) and its typing by the schema

Dependencies point one way: introspect and keyval use schema, schema uses
quickcheck. Nothing here knows the daemon or the monitor.
"""
