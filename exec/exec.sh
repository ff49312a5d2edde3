#!/usr/bin/env bash
# OpenVPN point-to-point over the endpoints plexus punched, in TLS mode with pinned self-signed certificates
# (like ssh host keys: each host trusts exactly the one peer certificate whose fingerprint it was given).
#
# One-time setup, on each of the two hosts:
#   exec.sh init [DIR]          make this host's key and certificate in DIR (default /etc/plexus/openvpn)
#                               and print the certificate's fingerprint
#   put the PEER's fingerprint into DIR/peer-fingerprint (one line, as `init` printed it on the peer)
#   exec.sh fingerprint [DIR]   prints this host's fingerprint again
#
# Run mode, as plexus launches it (needs root for the tun device; openvpn drops to nobody once it is up):
#   exec.sh innerip innerport outerip outerport peerip peerport [secret]
# Recommended: --exec-args="%innerip% %innerport% %outerip% %outerport% %peerip% %peerport%" (keeps the secret
# out of `ps`); plexus's default 7 arguments work too, the secret is ignored: the tunnel's keys come from the
# TLS handshake between the pinned certificates, never from anything that travelled by mail.
# Both ends run the same script: the side whose outer endpoint sorts first is the TLS server and takes the
# first tunnel address (SUBNET.1), the other side the TLS client and SUBNET.2, with no further exchange.
# When the IPv6 path won, plexus passes plain IPv6 addresses (no brackets); openvpn then speaks udp6, and an
# IPv6 endpoint sorts by its address written out in full (every group 4 hex digits), then its port: the same
# order on both hosts whichever of its spellings each was given.
# openvpn runs in the foreground and ends (it is not restarted) when the peer is silent for 30 s or the TLS
# handshake fails (a wrong fingerprint), so a cron job can tell a dead tunnel and reconnect.
#
# Environment:
#   PLEXUS_OPENVPN_DIR     the key, certificate and peer-fingerprint folder (default /etc/plexus/openvpn)
#   PLEXUS_TUNNEL_SUBNET   first three octets of the tunnel addresses (default 10.255.0)
#   PLEXUS_TUN_DEV         the tun device's name (default plexus0), so a health check knows where to look
#   PLEXUS_OPENVPN_ARGS    extra openvpn arguments (e.g. "--route 192.168.1.0 255.255.255.0")
set -euo pipefail
export LC_ALL=C  # one byte order for comparing endpoints, whatever the locale on either host
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin  # openvpn lives in sbin, which a cron job's PATH lacks

dir=${PLEXUS_OPENVPN_DIR:-/etc/plexus/openvpn}
me=${0##*/}

die() {
    echo "$me: $*" >&2
    exit 1
}

expand6() {  # an IPv6 address in full, 8 groups of 4 lowercase hex digits: 2001:db8::1 -> 2001:0db8:...:0001
    local address=${1,,} head=() tail=() groups=() full=() group
    if [[ $address == *::* ]]; then
        IFS=: read -ra head <<<"${address%%::*}"
        IFS=: read -ra tail <<<"${address#*::}"
        groups=("${head[@]}")
        while [ $((${#groups[@]} + ${#tail[@]})) -lt 8 ]; do groups+=(0); done
        groups+=("${tail[@]}")
    else
        IFS=: read -ra groups <<<"$address"
    fi
    [ ${#groups[@]} -eq 8 ] || die "not an IPv6 address: $1"
    for group in "${groups[@]}"; do
        [[ $group =~ ^[0-9a-f]{1,4}$ ]] || die "not an IPv6 address: $1"
        full+=("$(printf %04x "0x$group")")
    done
    (IFS=:; echo "${full[*]}")
}

endpoint_key() {  # what the TLS role decision compares: IPv4 as ip:port, IPv6 written out in full then .port
    local full
    if [[ $1 == *:* ]]; then
        full=$(expand6 "$1") || exit 1
        echo "$full.$2"
    else
        echo "$1:$2"
    fi
}

fingerprint() {  # the certificate's SHA-256 as --peer-fingerprint takes it: AB:CD:...
    openssl x509 -in "$1" -noout -fingerprint -sha256 | cut -d= -f2
}

case ${1:-} in
init)
    [ $# -le 2 ] || { echo "usage: $me init [DIR]" >&2; exit 2; }
    dir=${2:-$dir}
    command -v openssl >/dev/null || die "openssl is not installed"
    if [ -e "$dir/key.pem" ] || [ -e "$dir/cert.pem" ]; then
        die "$dir already holds a key or certificate: not overwriting it (\`$me fingerprint $dir\` prints it)"
    fi
    umask 077
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 36500 \
        -subj "/CN=plexus $HOSTNAME" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null \
        || die "openssl could not make the key and certificate in $dir"
    chmod 600 "$dir/key.pem"
    chmod 644 "$dir/cert.pem"
    fingerprint "$dir/cert.pem"
    echo "Above: this host's fingerprint, for the peer's peer-fingerprint file." \
        "Put the PEER's fingerprint (\`$me fingerprint\` there) into $dir/peer-fingerprint here." >&2
    exit 0
    ;;
fingerprint)
    [ $# -le 2 ] || { echo "usage: $me fingerprint [DIR]" >&2; exit 2; }
    dir=${2:-$dir}
    [ -f "$dir/cert.pem" ] || die "no certificate in $dir: run \`$me init $dir\` first"
    fingerprint "$dir/cert.pem"
    exit 0
    ;;
esac

if [ $# -ne 6 ] && [ $# -ne 7 ]; then
    echo "usage: $me innerip innerport outerip outerport peerip peerport [secret]" >&2
    echo "       $me init [DIR] | $me fingerprint [DIR]" >&2
    exit 2
fi
innerip=$1 innerport=$2 outerip=$3 outerport=$4 peerip=$5 peerport=$6  # $7, the secret, is not used
unset PLEXUS_SECRET  # plexus may pass it in the environment too: openvpn has no use for it
subnet=${PLEXUS_TUNNEL_SUBNET:-10.255.0}
dev=${PLEXUS_TUN_DEV:-plexus0}

# Every check before openvpn starts: a failure here is one line in plexus's --exec-log-file and an exit
# status plexus reports (exit 10 on the inviter), never an openvpn that retries forever.
[ "$(id -u)" -eq 0 ] || die "needs root (openvpn creates the tun device $dev, then drops to nobody)"
command -v openvpn >/dev/null || die "openvpn is not installed"
for file in key.pem cert.pem; do
    [ -f "$dir/$file" ] || die "no $dir/$file: run \`$me init $dir\` once on this host"
done
[ -f "$dir/peer-fingerprint" ] \
    || die "no $dir/peer-fingerprint: put the peer's fingerprint (\`$me fingerprint\` on the peer) there"
peer_fingerprint=$(grep -Eio -m1 '^ *([0-9a-f]{2}:){31}[0-9a-f]{2} *$' "$dir/peer-fingerprint" \
    | tr -d ' ' | tr a-f A-F) \
    || die "$dir/peer-fingerprint holds no SHA-256 fingerprint (AB:CD:... 32 pairs, as \`$me fingerprint\` prints)"

proto=udp
if [[ $peerip == *:* ]]; then
    proto=udp6
fi
outer_key=$(endpoint_key "$outerip" "$outerport")
# plexus --carry gives a loopback peer (itself) and the peer's own endpoint as PLEXUS_FARIP/PLEXUS_FARPORT
peer_key=$(endpoint_key "${PLEXUS_FARIP:-$peerip}" "${PLEXUS_FARPORT:-$peerport}")
if [[ $outer_key < $peer_key ]]; then
    local_address=$subnet.1 remote_address=$subnet.2 role=(--tls-server --dh none)
else
    local_address=$subnet.2 remote_address=$subnet.1 role=(--tls-client)
fi

group=nogroup
getent group nogroup >/dev/null || group=nobody  # Fedora, Arch: nobody's group is nobody

# shellcheck disable=SC2086  # PLEXUS_OPENVPN_ARGS is a list of words on purpose
exec openvpn --dev "$dev" --dev-type tun --proto "$proto" \
    --local "$innerip" --lport "$innerport" --remote "$peerip" --rport "$peerport" \
    --ifconfig "$local_address" "$remote_address" \
    "${role[@]}" --cert "$dir/cert.pem" --key "$dir/key.pem" --peer-fingerprint "$peer_fingerprint" \
    --user nobody --group "$group" --persist-tun --persist-key \
    --ping 5 --ping-exit 30 --tls-exit --verb 3 ${PLEXUS_OPENVPN_ARGS:-}
