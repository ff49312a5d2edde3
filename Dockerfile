# plexus in a container. NAT traversal needs the host's own UDP endpoint, so run it with the host network:
#   docker run --rm --network host -v /etc/plexus:/etc/plexus plexus --accept --config /etc/plexus/plexus.conf
# The examples install with the package: `plexus --examples` prints their folder, and the config's
#   exec-command = /usr/local/lib/python3.11/site-packages/plexus/examples/exec.sh
# brings up OpenVPN (installed here). It needs root at its start (the default user here), the NET_ADMIN
# capability and the tun device, then drops to nobody:
#   docker run --rm --network host --cap-add NET_ADMIN --device /dev/net/tun -v /etc/plexus:/etc/plexus plexus ...
# Any other command runs inside the container too: add it to an image FROM this one, or mount it.
# plexus is PID 1 here: it handles SIGTERM itself (docker stop ends it within a second, exit 0 for --accept)
# and stops the commands it launched before it exits.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openvpn openssl \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /tmp/plexus/
COPY plexus /tmp/plexus/plexus
# exec/: the examples (plexus/examples is a link to it)
COPY exec /tmp/plexus/exec
RUN pip install --no-cache-dir --root-user-action=ignore /tmp/plexus && rm -rf /tmp/plexus
ENTRYPOINT ["plexus"]
CMD ["--help"]
