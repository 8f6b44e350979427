"""Test harness shared by every mcore package (and third-party plugins).

* ``distributed`` / ``run_distributed``: run a test body in N processes with a gloo group.
* ``mcore_testing.numerics``: relative-error assertions, NaN checks, seeded inputs.
* ``mcore_testing.reference``: a tiny plain-PyTorch transformer and tiny data.
* ``mcore_testing.conformance``: one test class per core protocol to subclass.
* ``mcore_testing.hosts.isolated_host``: a plugin host with only the plugins a test names.
"""

from mcore_testing.__about__ import __version__
from mcore_testing.dist import DistributedTestError, distributed, run_distributed

__all__ = ["DistributedTestError", "__version__", "distributed", "run_distributed"]
