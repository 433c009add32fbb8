"""TCP sender: SIZE random bytes to ADDR:PORT, then prints their SHA-256 and
length. Usage: tcp_send.py ADDR PORT SIZE"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(hashlib.sha256(data).hexdigest(), len(data), flush=True)
