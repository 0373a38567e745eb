"""The selection scorers by name, and what each needs the prefill to capture.

Torch-free on purpose: grids, specs and ``scout ... --help`` name and check scorers without
importing the models. The scorer functions themselves are ``selection.SCORERS``, keyed alike
(tests/test_selection.py holds the two to the same names).
"""

from __future__ import annotations

# What each scorer needs the prefill to capture: "none", the last layer's query states
# ("last") or every layer's ("all").
CAPTURE: dict[str, str] = {
    "q2c": "last", "q2c_all_layers": "all", "snapkv": "last", "h2o": "last",
    "streaming": "none", "random": "none",
}
