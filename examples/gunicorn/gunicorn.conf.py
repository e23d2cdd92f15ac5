"""gunicorn's settings under baton (docs/recipes.md).

gunicorn takes the listener from LISTEN_FDS (baton's `protocol: systemd`) and sends READY=1 as
its arbiter boots, before any worker has loaded the app. So baton also waits for a probe, which
the first worker to finish loading opens (`post_worker_init`): a Unix socket of its own at
`BATON_PROBE_ADDRESS` answering `HTTP/1.1 200`. baton removes the socket file when the arbiter
exits.
"""

import os
import socket
import threading

workers = 2
graceful_timeout = 5  # below baton's drain_timeout
accesslog = None


def _answer(listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            except OSError:
                pass


def post_worker_init(worker):
    address = os.environ.get("BATON_PROBE_ADDRESS")
    if not address:
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError:
        listener.close()  # another worker of this arbiter was first: it answers
        return
    listener.listen(8)
    threading.Thread(target=_answer, args=(listener,), daemon=True).start()
