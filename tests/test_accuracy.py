"""Issue 3's exactness cases (bench/accuracy.py) in the suite: any byte lost fails CI.

The 100 MB transfers are left to `python bench/accuracy.py`; everything else runs here.
"""
import io
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import accuracy  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def test_every_connection_logged_exactly():
    out = io.StringIO()
    cases = [c for c in accuracy.ALL_CASES if c not in accuracy.SLOW]
    result, notes = accuracy.run(cases, out=out)
    print(out.getvalue())
    assert result.rows, "no connection was measured"
    assert {row[0] for row in result.rows} == set(cases)
    assert result.bad == [], "\n".join(map(str, result.bad))
    # Pre-forked workers are told apart by the socket each holds; a record may fall back to the
    # listener's holder only when it says so, and that must stay the exception.
    assert notes["accepted_seen_in_worker"] >= 1, notes
    # The drop case must really have dropped packets, or it proves nothing.
    assert notes["capture_dropped_packets"] > 0
