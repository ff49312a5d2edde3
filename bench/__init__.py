"""The plexus benchmark (python3 -m bench): time to connect, the NAT matrix, the footprint."""
