# lb's image: built with the project's own toolchain bootstrap, shipped on a small base.
#   docker build -t lb:0.1.0 .
# This pulls its base images from a registry. Without one, `cargo xtask image` builds a static lb
# into an image with no base, an OCI archive for `podman load -i`.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal
WORKDIR /src
COPY . .
# Installs rust-src and bpf-linker (against nightly rustc's LLVM), then builds lb with the eBPF
# programs embedded.
RUN cargo xtask build --release && cp target/release/lb /lb

FROM debian:bookworm-slim
COPY --from=build /lb /usr/local/bin/lb
ENTRYPOINT ["/usr/local/bin/lb"]
CMD ["run", "--help"]
