#!/usr/bin/env python3
"""A systemd-style baton worker in pure Python (standard library only).

It takes its listening sockets the systemd way: descriptors 3, 4, ... with LISTEN_FDS,
LISTEN_FDNAMES, and LISTEN_PID, which must be this process's pid (otherwise the descriptors were
meant for another process, and it refuses them, as sd_listen_fds(3) does). It reports READY=1 on
NOTIFY_SOCKET once it serves, and STOPPING=1 when it drains.

On SIGTERM (baton's drain signal) it stops accepting (connections waiting in the shared kernel
queue stay there for the new generation), answers the next request on each kept-alive connection
with `Connection: close`, lets idle ones time out, finishes what is in flight, and exits 0.
"""

import http.server
import os
import signal
import socket
import socketserver
import sys
import threading

SD_LISTEN_FDS_START = 3
draining = threading.Event()
generation = os.environ.get("BATON_GENERATION", "0")


def log(message):
    """One line on stderr in one write. stderr is the master's: print() writes the text and the
    newline separately, and a master line written in between would be glued to this one."""
    os.write(2, f"python worker pid {os.getpid()} {message}\n".encode())


def listen_fds():
    """The inherited listeners as (name, socket), or exit if they are not ours."""
    listen_pid = os.environ.get("LISTEN_PID")
    if listen_pid != str(os.getpid()):
        sys.exit(f"LISTEN_PID={listen_pid!r} is not this process ({os.getpid()}): refusing the descriptors")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    result = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        result.append((names[i] if i < len(names) and names[i] else f"fd{fd}", sock))
    return result


def notify(message):
    """Sends one sd_notify(3) datagram, if there is someone to tell. A failure is logged and
    changes nothing: a drain must go on when the master that asked for it is gone (its notify
    socket with it), or the serving threads would run on until killed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as err:
        log(f"sd_notify {message.split(chr(10))[0]!r}: {err}")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 5  # an idle kept-alive connection is closed after this

    def do_GET(self):
        body = f"hello from python pid {os.getpid()}, generation {generation}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Baton-Generation", generation)
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() waits for the requests in flight

    def __init__(self, sock):
        super().__init__(sock.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()  # the one socketserver made; ours is already bound and listening
        self.socket = sock
        # Several workers accept on one socket: the loser of a race must not block in accept().
        self.socket.setblocking(False)

    def get_request(self):
        conn, addr = self.socket.accept()
        conn.setblocking(True)
        return conn, addr


def main():
    sockets = listen_fds()
    if not sockets:
        sys.exit("no listeners: LISTEN_FDS is not set")
    servers = [Server(sock) for _, sock in sockets]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}) for s in servers]
    # SIGTERM is blocked in every thread (they inherit the mask) and taken by sigwait below. A
    # Python handler would run only when the kernel picks the main thread for the signal: picked
    # while serving, it would interrupt a server thread's poll, and the main thread, asleep in a
    # wait, would never run the handler: the worker would serve on until killed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    for t in threads:
        t.start()
    names = ", ".join(name for name, _ in sockets)
    notify(f"READY=1\nSTATUS=serving {names}")
    log(f"generation {generation} ready on {names}")
    signal.sigwait({signal.SIGTERM})
    draining.set()
    notify("STOPPING=1")
    for s in servers:
        s.shutdown()  # stop accepting
    for s in servers:
        s.server_close()  # wait for requests in flight
    log("drained: exiting")


if __name__ == "__main__":
    main()
