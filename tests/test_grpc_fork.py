"""A process using gRPC can still start children the way PySpark starts its JVM.

grpcio 1.81+ (issue grpc/grpc#43055, open) restarts its poller in a child forked by
``subprocess.Popen(..., preexec_fn=...)`` — how PySpark launches ``spark-submit`` — and the child
can die on ``epoll_wait: Bad file descriptor`` before it execs. In the suite that surfaced as
``JAVA_GATEWAY_EXITED`` for every Spark test of a pytest worker that had run a gRPC test first (one
fresh-clone ``make test`` in three). Measured with gRPC calls in flight: 4 of 300 such children
failed; with ``GRPC_ENABLE_FORK_SUPPORT=false`` 0 of 1,200. Importing ``serving`` (or any
``deepclick`` package) sets it before gRPC loads.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import os, subprocess, threading
    from concurrent import futures

    import serving  # noqa: F401  (what every process of ours that uses gRPC imports first)
    import grpc

    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false"
    server = grpc.server(futures.ThreadPoolExecutor(4))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    call = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/probe/Call")
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            try:
                call(b"", timeout=0.05)
            except grpc.RpcError:
                pass

    threading.Thread(target=busy, daemon=True).start()
    failed = sum(
        subprocess.Popen(["/bin/true"], preexec_fn=lambda: None, stdin=subprocess.PIPE).wait() != 0
        for _ in range(400)
    )
    stop.set()
    print(failed)
    """
)


def test_children_forked_beside_live_grpc_calls_reach_exec() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0", f"children that died before exec: {done.stdout}"
