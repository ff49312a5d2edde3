# plexus in a container. NAT traversal needs the host's own UDP endpoint, so run it with the host network:
#   docker run --rm --network host -v /etc/plexus:/etc/plexus plexus --config /etc/plexus/plexus.conf
# The launched command runs inside the container too: add it to the image (FROM this one) or mount it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openvpn \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/plexus
COPY pyproject.toml README.md ./
COPY plexus ./plexus
COPY exec ./exec
RUN pip install --no-cache-dir .
ENTRYPOINT ["plexus"]
CMD ["--help"]
