"""TCP sink: prints "ready", accepts one connection, reads it to the end and
prints the SHA-256 and length of what it read. Usage: tcp_sink.py ADDR PORT
(ADDR IPv4 or IPv6)"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(12)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(30)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
c.close()
print(h.hexdigest(), n, flush=True)
