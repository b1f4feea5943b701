"""deepclick.

Importing any part of the project first sets ``GRPC_ENABLE_FORK_SUPPORT=false`` (unless the
environment says otherwise), before gRPC loads: with grpcio 1.81+ a child forked by
``subprocess.Popen(..., preexec_fn=...)`` — how PySpark launches its JVM — restarts gRPC's poller
and can die before it execs (grpc/grpc#43055; measured 4 of 300 children beside live gRPC calls,
0 of 1,200 with the setting). Our processes fork only to exec, so gRPC's fork support buys nothing.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
