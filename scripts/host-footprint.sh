#!/usr/bin/env bash
# Prints what Nestbox instances hold on this machine, one item per line: network
# namespaces and links (nbx*), slot files, nftables tables, cgroups, guest memory
# directories and VMM processes. `make test` prints it before and after the suite and
# fails if the suite left anything that was not there before.
set -uo pipefail

ip netns list 2>/dev/null | awk '$1 ~ /^nbx/ {print "netns " $1}'
ip -br link 2>/dev/null | awk '{split($1, a, "@")} a[1] ~ /^nbx/ {print "link " a[1]}'
ls /run/nestbox/slots 2>/dev/null | sed 's/^/slot /'
nft list tables 2>/dev/null | awk '$3 ~ /^nestbox_/ {print "nftables " $3}'
for c in cpu memory pids; do
  ls -d /sys/fs/cgroup/"$c"/nestbox-* 2>/dev/null | sed 's/^/cgroup /'
done
ls -d /sys/fs/cgroup/nestbox-* 2>/dev/null | sed 's/^/cgroup /'
ls -d /dev/shm/nestbox-* 2>/dev/null | sed 's/^/memory /'
pgrep -a qemu-system 2>/dev/null | awk '{print "vmm " $1}'
exit 0
