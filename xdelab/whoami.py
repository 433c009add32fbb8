"""A TCP server for the lab that answers each connection with the address
and port it came from, one line ("ADDR PORT"), and closes it; each
connection is logged the same way on stdout. The internet host runs one on
port 80 (what a guest's connection looks like from outside: its external
address); `lab ping` runs one for a single connection in g2.

    python -m xdelab.whoami ADDR PORT [--once]

Prints "ready" once listening."""
import socket
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        addr, port = self.client_address[:2]
        if addr.startswith("::ffff:") and "." in addr:   # an IPv4 peer of a dual-stack server
            addr = addr[7:]
        print(f"{addr} {port}", flush=True)
        self.request.sendall(f"{addr} {port}\n".encode())


def serve(addr, port, once=False):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    # one connection: answered before the server closes (a thread might not be)
    base = socketserver.TCPServer if once else socketserver.ThreadingTCPServer
    server_class = type("Server", (base,),
                        {"address_family": family, "allow_reuse_address": True,
                         "daemon_threads": True})
    with server_class((addr, port), Handler) as s:
        print("ready", flush=True)
        if once:
            s.handle_request()
        else:
            s.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), once="--once" in sys.argv[3:])
