"""UDP sink: prints "ready", then one JSON list of [source port, length,
sha256] per datagram once it has read "END" (or gone quiet for 5 s).
Usage: udp_sink.py ADDR PORT"""
import hashlib, json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
print("ready", flush=True)
got = []
while True:
    try:
        d, a = s.recvfrom(65535)
    except socket.timeout:
        break
    if d == b"END":
        break
    got.append([a[1], len(d), hashlib.sha256(d).hexdigest()])
print(json.dumps(got), flush=True)
