"""Derivation engines: ``sqlite`` (SQL lambdas) and ``python`` (``module:function`` lambdas).

Each engine module exposes ``check(catalog, collection, place) -> problems`` for
`localflow validate` and ``build(catalog, collection) -> Engine`` for the derivation worker; it is
registered by an entry point in pyproject.toml (``localflow.engines``).
"""
