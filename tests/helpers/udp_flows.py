"""Many UDP flows, one unconnected socket per source port, round-robin,
then "END" three times. Usage: udp_flows.py DST PORT BASE_SPORT NFLOWS NPACKETS SRC"""
import socket, sys, time
dst, port, base, nflows, npk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
src = sys.argv[6]
socks = []
for i in range(nflows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, base + i))
    socks.append(s)
for k in range(npk):
    for s in socks:
        s.sendto(b"flow %05d packet %05d" % (s.getsockname()[1], k), (dst, port))
    time.sleep(0.003)
time.sleep(0.2)
for _ in range(3):
    socks[0].sendto(b"END", (dst, port))
