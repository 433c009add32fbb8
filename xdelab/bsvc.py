"""A tiny boundary-services host for the lab: it receives Geneve on UDP
6081 at its underlay address, answers ICMP echo requests for any address
outside the VPC (decap, reply, encap in the VPC's VNI), and drops the rest.

Run inside the lab's boundary namespace: `python -m xdelab.bsvc ADDR VNI`.
"""
import socket
import struct
import sys

GENEVE_PORT = 6081
UDP_NO_CHECK6_RX = 102
BSVC_MAC = bytes.fromhex("a84025777777")


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def reply(payload, vpc_vni):
    """Geneve payload of an echo request -> Geneve payload of the reply, or None."""
    if len(payload) < 8:
        return None
    optlen = (payload[0] & 0x3F) * 4
    inner = payload[8 + optlen:]
    if len(inner) < 14 + 20 + 8 or inner[12:14] != b"\x08\x00":
        return None
    ihl = (inner[14] & 0x0F) * 4
    ip = bytearray(inner[14:14 + ihl])
    icmp = bytearray(inner[14 + ihl:14 + struct.unpack("!H", ip[2:4])[0]])
    if ip[9] != 1 or len(icmp) < 8 or icmp[0] != 8:
        return None
    ip[12:16], ip[16:20] = ip[16:20], ip[12:16]
    ip[8] = 64
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    eth = inner[6:12] + BSVC_MAC + b"\x08\x00"
    geneve = struct.pack("!BBH", 0, 0, 0x6558) + vpc_vni.to_bytes(3, "big") + b"\0"
    return geneve + eth + bytes(ip) + bytes(icmp)


def serve(addr, vpc_vni):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    # xde sends UDP checksum 0, allowed for tunnels over IPv6 (RFC 6935)
    s.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_RX, 1)
    s.bind((addr, GENEVE_PORT))
    while True:
        data, peer = s.recvfrom(65535)
        out = reply(data, vpc_vni)
        if out:
            s.sendto(out, (peer[0], GENEVE_PORT))


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
