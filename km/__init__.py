"""kanerva-lab. The Python API (km/api.py) is importable from here without loading torch until it is used:

import km
run = km.load("runs/cpu_km_omniglot/s1")
"""

__all__ = ["Run", "compose", "load", "fit"]


def __getattr__(name: str):  # lazy: `km.cli` imports this package and must start without torch
    if name in __all__:
        from km import api

        return getattr(api, name)
    raise AttributeError(f"module 'km' has no attribute {name!r}")
