#!/usr/bin/env bash
# OpenVPN point-to-point over the endpoints plexus punched. plexus runs it as
#   exec.sh innerip innerport outerip outerport peerip peerport secret
# (its default argument order). Both ends run the same script; the side whose outer endpoint sorts first
# takes the first tunnel address, so the two ends always differ without any further exchange.
#
# Environment:
#   PLEXUS_OPENVPN_KEY     an OpenVPN static key file shared by both hosts (recommended); without it the key is
#                          derived from plexus's 64-bit secret, which is fine for a test, weak for real use
#   PLEXUS_TUNNEL_SUBNET   first three octets of the tunnel addresses (default 10.255.0)
#   PLEXUS_OPENVPN_ARGS    extra openvpn arguments (e.g. "--daemon" or "--route 192.168.1.0 255.255.255.0")
set -euo pipefail

if [ $# -lt 7 ]; then
    echo "usage: $0 innerip innerport outerip outerport peerip peerport secret" >&2
    exit 2
fi
innerip=$1 innerport=$2 outerip=$3 outerport=$4 peerip=$5 peerport=$6 secret=$7
subnet=${PLEXUS_TUNNEL_SUBNET:-10.255.0}

if [[ "$outerip:$outerport" < "$peerip:$peerport" ]]; then
    local_address=$subnet.1 remote_address=$subnet.2
else
    local_address=$subnet.2 remote_address=$subnet.1
fi

key=${PLEXUS_OPENVPN_KEY:-}
if [ -z "$key" ]; then
    key=$(mktemp)
    trap 'rm -f "$key"' EXIT
    {
        echo "-----BEGIN OpenVPN Static key V1-----"
        for i in 0 1 2 3; do printf 'plexus-openvpn:%s:%s' "$secret" "$i" | sha512sum | cut -c1-128; done \
            | tr -d '\n' | fold -w 32
        echo
        echo "-----END OpenVPN Static key V1-----"
    } > "$key"
fi

# shellcheck disable=SC2086  # PLEXUS_OPENVPN_ARGS is a list of words on purpose
openvpn --dev tun --proto udp \
    --local "$innerip" --lport "$innerport" --remote "$peerip" --rport "$peerport" \
    --ifconfig "$local_address" "$remote_address" \
    --secret "$key" --cipher AES-256-CBC --auth SHA256 \
    --ping 5 --ping-restart 60 --verb 3 ${PLEXUS_OPENVPN_ARGS:-}
