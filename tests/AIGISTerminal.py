"""``import AIGISTerminal; import aigis`` connects ``aigis`` to the running AIGIS core.

The address and authkey come from ``AIGIS_ADDRESS`` (a Unix socket path or ``tcp:HOST:PORT``)
and ``AIGIS_AUTHKEY_FILE``; without them, the packaged defaults in ``aigis._rpc.client`` apply.
The connection opens on the first call.
"""

import sys
from pathlib import Path

try:
    import aigis._rpc.client  # noqa: F401
except ImportError:
    # run from the tests/ directory of a checkout: use the package beside it
    _checkout = Path(__file__).resolve().parent.parent
    if not (_checkout / "aigis" / "__init__.py").is_file():
        raise
    sys.path.insert(0, str(_checkout))

from aigis._rpc.client import connect_from_env  # noqa: E402
from aigis._rpc.proxy import make_proxy_module  # noqa: E402

sys.modules["aigis"] = make_proxy_module(connect_from_env())
