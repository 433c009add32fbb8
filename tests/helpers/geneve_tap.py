"""A userspace Geneve endpoint behind a TAP device: a stand-in sled for the
boundary tests, where the kernel has no Geneve device of its own.

    geneve_tap.py LOCAL_ADDR PEER_ADDR IN_VNI OUT_VNI TAP

Geneve arriving on UDP 6081 at LOCAL_ADDR in IN_VNI has its header and
options stripped and its inner frame written to the TAP (the host's stack
sees it arrive there); IPv4 and IPv6 frames the host sends out of the TAP
leave in Geneve to PEER_ADDR in OUT_VNI, without options. Prints "ready"
once both ends are open; runs until killed."""
import fcntl
import os
import select
import socket
import struct
import sys

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
UDP_NO_CHECK6_TX, UDP_NO_CHECK6_RX = 101, 102
GENEVE_PORT = 6081


def main(local, peer, in_vni, out_vni, tap):
    in_vni, out_vni = int(in_vni), int(out_vni)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_RX, 1)   # the boundary sends checksum 0
    s.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_TX, 1)
    s.bind((local, GENEVE_PORT))
    print("ready", flush=True)
    header = struct.pack("!BBH", 0, 0, 0x6558) + out_vni.to_bytes(3, "big") + b"\0"
    while True:
        for r in select.select([s, fd], [], [])[0]:
            if r is s:
                data = s.recv(65535)
                if len(data) < 8 or int.from_bytes(data[4:7], "big") != in_vni:
                    continue
                inner = data[8 + (data[0] & 0x3F) * 4:]
                if len(inner) >= 14:
                    os.write(fd, inner)
            else:
                frame = os.read(fd, 65535)
                if frame[12:14] in (b"\x08\x00", b"\x86\xdd"):
                    s.sendto(header + frame, (peer, GENEVE_PORT))


if __name__ == "__main__":
    main(*sys.argv[1:])
