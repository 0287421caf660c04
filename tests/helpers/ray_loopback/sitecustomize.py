"""Keep Ray on 127.0.0.1 in the tests (this folder goes first on PYTHONPATH for every process the
tests start: ``ray start``, its workers, stage commands, the pytest process itself).

Ray turns a node address of 127.0.0.1 into the machine's routable address
(``services.resolve_ip_for_localhost``), so its servers would listen on every interface and a
driver would dial the routable address. Tests bind to loopback only, so that conversion is undone
here. A real cluster never needs this: its nodes have real addresses.
"""

try:
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        import ray._private.services as _services

        _services.resolve_ip_for_localhost = lambda host: host
except Exception:  # pragma: no cover - Ray absent or changed: the tests that need it will say so
    pass
