"""xde for Linux: control plane of the eBPF overlay datapath."""
