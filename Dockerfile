# linkdns in a container. Build from the repository root:
#   docker build -t linkdns .
# Run it on each host as the host's own node (host network and PID namespaces: it answers on
# the host's addresses, programs the host's routes and finds containers' processes in /proc):
#   docker run -d --name linkdns --restart on-failure --network host --pid host \
#     --cap-add NET_ADMIN --cap-add NET_RAW \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /var/lib/linkdns:/var/lib/linkdns \
#     -e LINKDNS_JOIN=172.30.0.1:7380 -e LINKDNS_TOKEN_FILE=/var/lib/linkdns/join.token \
#     linkdns
# (leave out LINKDNS_JOIN and LINKDNS_TOKEN_FILE on the first host.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p linkdns

FROM debian:bookworm-slim
# iptables for the forwarding rules; the routes go through netlink.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/linkdns /usr/local/bin/linkdns
VOLUME /var/lib/linkdns
ENTRYPOINT ["/usr/local/bin/linkdns"]
CMD ["run"]
# Healthy while DNS answers from a replica that follows a leader or is caught up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/linkdns", "ready"]
