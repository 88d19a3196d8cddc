"""Pytest plugin: apply one audit mutation whose shared pattern no longer matches the code.

The shared plugin (``mutplugin.py`` of the audit) is left untouched; a mutation whose
pattern was refactored away is re-expressed here with the same meaning on the current
code (:data:`MOVED`). Selected by the environment variable ``AUDIT_MUT``; the directory of
the shared plugin comes from ``AUDIT_PLUGIN_DIR``.
"""

from __future__ import annotations

import os
import sys

# name: [(module, old, new)], the same mutation as the audit's, on the current code.
MOVED: dict[str, list[tuple[str, str, str]]] = {
    # natgrad/rat.py now computes both by-products on one line (then checks them finite).
    "dfd_wrong": [
        (
            "natgrad.rat",
            "g_dot_d, d_fisher_d = float(rhs @ jd) / n, float(jd @ jd) / n",
            "g_dot_d, d_fisher_d = float(rhs @ jd) / n, 0.6 * float(jd @ jd) / n",
        )
    ],
}

NAME = os.environ.get("AUDIT_MUT", "")
if NAME:
    sys.path.insert(0, os.environ["AUDIT_PLUGIN_DIR"])
    os.environ.pop("MUT", None)
    import mutplugin  # noqa: E402  (with MUT unset it only defines apply/MUTATIONS)

    import natgrad  # noqa: E402, F401
    import natgrad.rat  # noqa: E402, F401
    import natgrad.solvers  # noqa: E402, F401

    try:
        import natgrad.rl  # noqa: E402, F401
        import natgrad.rl.algorithms  # noqa: E402, F401
        import natgrad.rl.train  # noqa: E402, F401
    except Exception:  # noqa: BLE001 - the rl extra may be missing
        pass
    grouped: dict[str, list[tuple[str, str]]] = {}
    for module, old, new in MOVED[NAME]:
        grouped.setdefault(module, []).append((old, new))
    for module, pairs in grouped.items():
        mutplugin.apply(module, pairs)
    sys.stderr.write(f"[audit_plugin] applied moved mutation {NAME}\n")
